"""The ``collect`` job kind: feature statistics for a run, in one job or split into shards.

The corpus for the organism is the target's own greedy responses to the held-out problems, in its
chat format (what the paper collects on: the reasoning model's text); for a user's pair the run's own
texts (its training file), or another JSONL file of texts. It is built once per run and source and saved
beside the checkpoint, so every shard sees the same sequences. With ``n_shards > 1`` the job queues one ``collect`` job per shard; each shard saves its
partial statistics, and the shard that finds all others saved merges and writes them (a merge is
exact, and the write replaces the run's rows, so a repeated merge is harmless).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from app.db import queue
from worker.collect.corpus import Corpus, Markers
from worker.collect.result import CollectionResult, merge_results
from worker.collect.runner import collect
from worker.collect.store import write_collection
from worker.handlers import JobContext, register

log = logging.getLogger(__name__)


class CollectPayload(BaseModel):
    run_id: int
    n_prompts: int = Field(600, ge=1, description="organism: held-out problems whose target responses form the corpus")
    max_new_tokens: int = Field(96, ge=1, le=8192)
    corpus_path: str | None = Field(None, description="JSONL with a 'text' field (default: the run's own texts)")
    n_texts: int | None = Field(None, ge=1, description="texts of the corpus file used (default: all of a "
                                "corpus_path, the first 2,000 of the run's own texts)")
    top_k: int = Field(20, ge=1, le=1000)
    n_random: int = Field(10, ge=0, le=1000)
    n_quantile: int = Field(2, ge=0, le=100, description="examples per half-decade activation band")
    n_shards: int = Field(1, ge=1, le=1024)
    shard: int | None = Field(None, ge=0, description="set on the shard jobs that a sharded collect queues")
    seed: int = 0
    label: bool = Field(True, description="label every feature with the built-in rules once stored (app/labels/; "
                        "about 800 features/s on one core)")

    @model_validator(mode="after")
    def _shard_in_range(self) -> CollectPayload:
        if self.shard is not None and self.shard >= self.n_shards:
            raise ValueError(f"shard {self.shard} out of range for n_shards={self.n_shards}")
        return self


def _collect_dir(ctx: JobContext, run_name: str) -> Path:
    path = ctx.job_settings().runs_dir / run_name / "collect"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_save(obj: Corpus | CollectionResult, path: Path) -> None:
    """Save through a temporary file, so a shard never reads another's half-written file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    obj.save(tmp)
    os.replace(tmp, path)


RUN_TEXTS_DEFAULT = 2000  # texts of a run's own file collected on when the payload names no corpus


def corpus_source(run, p: CollectPayload) -> tuple[str | None, int | None]:
    """(JSONL file, how many texts) the corpus is read from; (None, None) for the organism's generations."""
    from worker.run_data import data_config

    if p.corpus_path is not None:
        return p.corpus_path, p.n_texts
    data = data_config(run)
    if data.get("kind") == "jsonl":
        return data["path"], p.n_texts or RUN_TEXTS_DEFAULT
    if data.get("kind") != "organism":
        raise ValueError(f"run {run.name!r} has no texts of its own to collect on: give corpus_path (JSONL with a "
                         "'text' field; e.g. the target's reasoning traces)")
    return None, None


def build_corpus(ctx: JobContext, model, tokenizer, run, p: CollectPayload) -> Corpus:
    """The run's collection corpus (cached in the run directory, per source)."""
    from training.config import train_config_from_dict
    from training.generation import generate
    from worker.run_data import run_prompts

    source, limit = corpus_source(run, p)
    key = (f"file-{hashlib.sha1(f'{Path(source).resolve()}:{limit}'.encode()).hexdigest()[:10]}" if source
           else f"{p.n_prompts}-{p.max_new_tokens}")
    path = _collect_dir(ctx, run.name) / f"corpus-{key}.pt"
    markers = Markers.from_tokenizer(tokenizer)
    if path.is_file():
        return Corpus.load(path)
    if source is not None:
        from worker.collect.corpus import load_corpus

        max_len = train_config_from_dict((run.config or {}).get("train") or {}).max_seq_len
        ctx.progress(0, None, f"tokenizing the corpus {Path(source).name}")
        is_file = Path(source).is_file() and not source.endswith(".pt")
        corpus = load_corpus(source, tokenizer, **({"limit": limit, "max_length": max_len} if is_file else {}))
    else:
        prompts = run_prompts(run, tokenizer, n=p.n_prompts).texts
        ctx.progress(0, None, f"generating the corpus: target responses to {len(prompts)} prompts")
        with model.mode("target"):
            gens = generate(model, tokenizer, prompts, max_new_tokens=p.max_new_tokens, greedy=True)
        corpus = Corpus.from_sequences([g.token_ids for g in gens], markers=markers,
                                       prompt_lengths=[len(g.prompt_ids) for g in gens])
    _atomic_save(corpus, path)
    return corpus


@register("collect", CollectPayload)
def collect_job(ctx: JobContext) -> dict:
    from worker.models_cache import get_run_model
    from worker.pipeline import get_run, update_run

    p: CollectPayload = ctx.payload
    run = get_run(ctx, p.run_id)
    if p.n_shards > 1 and p.shard is None:  # the parent: queue one job per shard
        ids = [queue.enqueue(ctx.engine, "collect", {**p.model_dump(), "shard": i}, run_id=p.run_id)
               for i in range(p.n_shards)]
        return {"shard_jobs": ids}
    model, tokenizer = get_run_model(ctx.job_settings(), p.run_id)
    corpus = build_corpus(ctx, model, tokenizer, run, p)
    shard = (p.shard, p.n_shards) if p.shard is not None else None

    def progress(done: float, total: float | None, message: str | None = None) -> None:
        ctx.progress(done, total, message or "collecting")
        ctx.check()

    from training.generation import model_vocab_size, token_mask
    from training.hesitation import (
        HesitationWordsError,
        hesitation_token_ids,
        normalize_words,
        words_from_config,
    )

    try:
        words = words_from_config(run.config)
    except HesitationWordsError:  # an unusable stored list: the default words, as the pages do
        words = normalize_words(None)
    result = collect(model, corpus, top_k=p.top_k, n_random=p.n_random, n_quantile=p.n_quantile, shard=shard,
                     seed=p.seed, progress=progress, token_mask=token_mask(tokenizer, model_vocab_size(model)),
                     hesitation_ids=sorted(hesitation_token_ids(tokenizer, words)))
    if shard is not None:
        folder = _collect_dir(ctx, run.name) / f"shards-{p.n_shards}"
        folder.mkdir(exist_ok=True)
        _atomic_save(result, folder / f"shard-{p.shard}.pt")
        files = [folder / f"shard-{i}.pt" for i in range(p.n_shards)]
        if not all(f.is_file() for f in files):
            return {"shard": p.shard, "sequences": result.n_sequences, "merged": False}
        result = merge_results(*(CollectionResult.load(f) for f in files))
    counts = _write(ctx, p.run_id, result, tokenizer, corpus)
    labels = _label(ctx, p.run_id) if p.label else None
    update_run(ctx, p.run_id, status="collected")
    return {"sequences": result.n_sequences, "tokens": corpus.n_tokens, **counts, "merged": True,
            "labels": labels, "summary": result.summary()}


def _label(ctx: JobContext, run_id: int) -> dict:
    """Every feature gets the built-in rules' label and category (app/labels/builtin.py) as soon as it is stored."""
    from app.labels.run import label_run

    return label_run(ctx.engine, run_id, data_dir=ctx.job_settings().resolved_data_dir,
                     progress=lambda done, total, msg=None: ctx.progress(done, total, msg), check=ctx.check)


def _write(ctx: JobContext, run_id: int, result: CollectionResult, tokenizer, corpus: Corpus) -> dict[str, int]:
    """Features and examples, and the corpus sequences the examples come from (the feature page links each
    example to its sequence in the trace viewer)."""
    ctx.progress(0, None, "writing features and examples")
    return write_collection(ctx.engine, run_id, result, tokenizer, corpus=corpus)
