"""The ``ablate`` and ``experiment`` job handlers.

``ablate`` (interactive): one prompt, generated with the same seed and settings with and without the
intervention (one lockstep batch: ablated, its unablated reference for the per-token KL, unablated), then
optionally by the target and the hybrid. Tokens stream into ``ablation_tokens`` while they are generated
(the first at once, then every ``FLUSH_INTERVAL_S``) so a page can show progress; the job checks for
cancellation between tokens. The summary (response length, hesitation tokens, final answer, whether it
changed and is correct where the answer is known, KL statistics) goes into ``ablations.summary``.

``experiment`` (batch): the same intervention over a prompt set. ``necessity``: conditions ``unablated``
and ``ablated`` (the paper's experiment: remove a feature set from the adapted model); ``sufficiency``:
``unablated``, ``set-only`` (every feature outside the set zeroed) and ``hybrid``. Prompts are generated
``batch_size`` at a time (left-padded, one lockstep batch per model mode); one ``experiment_rows`` row per
prompt and condition as each batch finishes; distributions per condition in ``experiments.summary``.

Both handlers are idempotent: a re-run replaces the rows of its ablation or experiment.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from app.db import queue
from app.db.requests import (
    AblationRequestError,
    GenerationOptions,
    PromptItem,
    ResolvedAblation,
    ResolvedExperiment,
    ResolvedSelection,
    check_prompt_length,
    load_jsonl,
)
from app.db.schema import Ablation, AblationToken, Experiment, ExperimentRow, Prompt, Run, utcnow
from app.db.text import storable
from app.db.write import replace_rows, upsert
from app.settings import Settings
from training.adapter import AdapterModel, MLPMode
from training.chat import PLACEHOLDER, ChatFormat, chat_format_for
from training.hesitation import HesitationCounter, normalize_words
from training.interventions import Intervention
from training.organism.tasks import extract_answer
from worker.ablation.generate import (
    ABLATED,
    REFERENCE,
    UNABLATED,
    Generated,
    SamplingSettings,
    Step,
    Track,
    ablation_tracks,
    lockstep,
    lockstep_prompts,
)
from worker.handlers import JobContext, JobInterrupted, register

log = logging.getLogger(__name__)

PROMPT_SHOWN_MAX = 300  # characters of each experiment prompt kept with its rows, for the page

FLUSH_INTERVAL_S = 0.2  # seconds between token writes while generating (the first token is written at once)
TOKEN_STR_MAX = 200  # characters of a token's text stored (the column's width)
SET_ONLY = "set-only"
HYBRID = "hybrid"


class AblatePayload(BaseModel):
    ablation_id: int


class ExperimentPayload(BaseModel):
    experiment_id: int


# ------------------------------------------------------------------------------------- the model


ModelLoader = Callable[[JobContext, int], tuple[AdapterModel, Any]]


def load_run_model(ctx: JobContext, run_id: int) -> tuple[AdapterModel, Any]:
    """The run's adapter model and tokenizer, from the worker's model cache."""
    from worker.models_cache import get_run_model

    return get_run_model(ctx.job_settings(), run_id)


_loader: list[ModelLoader] = [load_run_model]


@contextmanager
def use_model_loader(loader: ModelLoader) -> Iterator[None]:
    """Run jobs with another model source (tests and benchmarks hand in a model built in memory)."""
    _loader.append(loader)
    try:
        yield
    finally:
        _loader.remove(loader)


def _model(ctx: JobContext, run_id: int) -> tuple[AdapterModel, Any]:
    return _loader[-1](ctx, run_id)


# ------------------------------------------------------------------------------ building blocks


def build_interventions(sel: ResolvedSelection, n_layers: int) -> list[Intervention]:
    """The selection as :class:`Intervention` objects: explicit pairs plus whole layers, or their complement."""
    common = {"mode": sel.mode, "value": sel.value, "positions": sel.positions}
    pairs = tuple(map(tuple, sel.features))
    if sel.complement:  # touch everything outside the selection: whole selected layers are left alone
        layers = tuple(layer for layer in range(n_layers) if layer not in sel.all_layers)
        return [Intervention(pairs, complement=True, layers=layers, **common)] if layers else []
    ivs = [Intervention(pairs, **common)] if pairs else []
    if sel.all_layers:
        ivs.append(Intervention((), complement=True, layers=tuple(sel.all_layers), **common))
    return ivs


def sampling_settings(gen: GenerationOptions, model: AdapterModel, tokenizer: Any) -> SamplingSettings:
    from training.generation import model_vocab_size, padded_ids

    eos = tokenizer.eos_token_id
    return SamplingSettings(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, seed=gen.seed,
                            stop_ids=() if eos is None else (eos,),
                            context_length=getattr(model.config, "max_position_embeddings", None),
                            suppress_ids=tuple(padded_ids(tokenizer, model_vocab_size(model))))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt as training and generation see it (with the tokenizer's ``bos``, once)."""
    bos = getattr(tokenizer, "bos_token", None)
    already = bool(bos) and text.startswith(bos)  # a chat template may have written it already
    return list(tokenizer(text, add_special_tokens=not already)["input_ids"])


def run_chat_format(tokenizer: Any, config: dict | None) -> ChatFormat:
    """The run's chat format: stored in its config, else its tokenizer's chat template, else DeepSeek-R1's."""
    return chat_format_for(config, getattr(tokenizer, "chat_template", None),
                           bos_token=getattr(tokenizer, "bos_token", None), eos_token=getattr(tokenizer, "eos_token", None))


def is_chat_formatted(text: str, fmt: ChatFormat) -> bool:
    """Whether free text already holds the run's chat markers (a user pasted a formatted prompt)."""
    head, tail = fmt.template.split(PLACEHOLDER)
    return any(m.strip() and m.strip() in text for m in (head, tail))


def format_free_text(tokenizer: Any, text: str, *, chat: bool = True, config: dict | None = None) -> str:
    """A user's free text as the model is prompted, in the run's chat format (:func:`run_chat_format`).

    Text already in that format is used as it is, so a pasted formatted prompt is never wrapped twice.
    """
    if not chat:
        return text
    fmt = run_chat_format(tokenizer, config)
    return text if is_chat_formatted(text, fmt) else fmt.format(text)


@lru_cache(maxsize=8)
def hesitation_counter(tokenizer: Any, words: tuple[str, ...]) -> HesitationCounter:
    """The one hesitation definition on this tokenizer and words (its per-id pieces are cached)."""
    return HesitationCounter.for_tokenizer(tokenizer, words)


def run_hesitation_words(run: Run | None) -> tuple[str, ...]:
    """The run's configured hesitation words (``runs.config["hesitation_words"]``), else the default list."""
    words = ((run.config or {}).get("hesitation_words") if run is not None else None) or None
    return normalize_words(words)


def _same_answer(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


def summarize(gen: Generated, tokenizer: Any, answer: str | None,
              words: tuple[str, ...] = normalize_words(None)) -> dict[str, Any]:
    """Response length (stop token excluded), hesitation tokens, final answer and correctness of one condition."""
    ids = gen.token_ids[:-1] if gen.stop == "eos" else gen.token_ids
    found = extract_answer(tokenizer.decode(ids, skip_special_tokens=False))
    kls = [k for k in gen.kls if k is not None]
    out: dict[str, Any] = {
        "response_length": len(ids), "hesitations": hesitation_counter(tokenizer, words).count(ids),
        "answer": found, "correct": None if answer is None else _same_answer(found, answer), "stop": gen.stop,
    }
    if kls:
        out.update(mean_kl=sum(kls) / len(kls), max_kl=max(kls))
    return out


def _drain(steps: Iterator[list[Step]], ctx: JobContext, on_step: Callable[[list[Step]], None]) -> None:
    """Consume a lockstep iterator, checking for cancellation between tokens; the iterator is closed either way."""
    try:
        for batch in steps:
            on_step(batch)
            ctx.check()
    finally:
        steps.close()


def _accumulate(into: list[dict[str, Generated]]) -> Callable[[list[Step]], None]:
    """A step callback that files each step under its prompt and track."""
    def add(batch: list[Step]) -> None:
        for s in batch:
            into[s.prompt].setdefault(s.track, Generated()).add(s)
    return add


def _first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _set_row(ctx: JobContext, table: type[Ablation] | type[Experiment], row_id: int, **values: Any) -> None:
    with ctx.session() as s:
        row = s.get(table, row_id)
        for k, v in values.items():
            setattr(row, k, v)


def _tracked(ctx: JobContext, table: type[Ablation] | type[Experiment], row_id: int, children: type, key: str,
             resolved_model: type[BaseModel], body: Callable[[JobContext, int, Any], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` for a stored request row: status running (a re-run first clears its child rows), then done
    with the summary, failed with the error, or cancelled (``todo`` again when the worker gave the job back)."""
    with ctx.session() as s:
        row = s.get(table, row_id)
        if row is None:
            raise ValueError(f"{table.__tablename__} row {row_id} does not exist (deleted after it was queued?)")
        resolved = resolved_model.model_validate(row.request)
        replace_rows(s, children, {key: row_id}, [])
        row.status, row.error, row.finished, row.summary = "running", None, None, None
    try:
        summary = body(ctx, row_id, resolved)
    except JobInterrupted:
        cancelled = ctx.job_id is not None and queue.is_cancelled(ctx.engine, ctx.job_id)
        _set_row(ctx, table, row_id, status="cancelled" if cancelled else "todo", finished=utcnow())
        raise
    except Exception as exc:
        _set_row(ctx, table, row_id, status="failed", error=str(exc), finished=utcnow())
        raise
    _set_row(ctx, table, row_id, status="done", summary=summary, finished=utcnow())
    return summary


# ------------------------------------------------------------------------------------- ablate


class _TokenWriter:
    """Buffers ``ablation_tokens`` rows and commits them at most every ``FLUSH_INTERVAL_S``."""

    def __init__(self, ctx: JobContext, ablation_id: int, tokenizer: Any) -> None:
        self.ctx, self.ablation_id, self.tokenizer = ctx, ablation_id, tokenizer
        self.rows: list[dict[str, Any]] = []
        self.last = -math.inf
        self.written = 0

    def add(self, condition: str, step: Step) -> None:
        self.rows.append({
            "ablation_id": self.ablation_id, "condition": condition, "step": step.index, "token_id": step.token_id,
            "token_str": storable(self.tokenizer.decode([step.token_id]))[:TOKEN_STR_MAX], "logprob": step.logprob,
            "kl": step.kl,
        })
        if time.monotonic() - self.last >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            with self.ctx.session() as s:
                upsert(s, AblationToken, self.rows)
            self.written += len(self.rows)
            self.rows = []
        self.last = time.monotonic()


@register("ablate", AblatePayload)
def ablate(ctx: JobContext) -> dict[str, Any]:
    """Run a stored ablation request (see the module docstring); returns its summary."""
    return _tracked(ctx, Ablation, ctx.payload.ablation_id, AblationToken, "ablation_id", ResolvedAblation,
                    _run_ablation)


def _run_ablation(ctx: JobContext, ablation_id: int, resolved: ResolvedAblation) -> dict[str, Any]:
    req = resolved.request
    model, tokenizer = _model(ctx, req.run_id)
    settings = sampling_settings(req.generation, model, tokenizer)
    if req.target_token_id is not None:
        vocab = model.hf.get_input_embeddings().num_embeddings
        if req.target_token_id >= vocab:
            raise AblationRequestError(f"target_token_id {req.target_token_id} is not in the model's vocabulary "
                                       f"of {vocab}")
        settings = replace(settings, watch_ids=(req.target_token_id,))
    if resolved.prompt_ids is not None:
        prompt_ids = resolved.prompt_ids
    else:
        prompt_ids = encode(tokenizer, format_free_text(tokenizer, resolved.prompt_text, chat=req.chat,
                                                         config=_run_config(ctx, req.run_id)))
    _check_ids(prompt_ids, model)
    check_prompt_length(len(prompt_ids), settings.context_length)
    ivs = build_interventions(resolved.selection, model.n_layers)
    writer = _TokenWriter(ctx, ablation_id, tokenizer)
    done: dict[str, Generated] = {}
    record = _accumulate([done])
    total = req.generation.max_new_tokens

    def on_step(batch: list[Step]) -> None:
        record(batch)
        for s in batch:
            writer.add(s.track, s)
        ctx.progress(batch[0].index + 1, total, "generating")

    try:
        _drain(lockstep(model, prompt_ids, ablation_tracks(ivs), settings), ctx, on_step)
        for mode in dict.fromkeys(req.compare):
            _drain(lockstep(model, prompt_ids, [Track(mode)], settings, mode=mode), ctx, on_step)
    finally:
        writer.flush()  # what was generated stays visible, also after a cancel
    summary: dict[str, Any] = {
        "prompt_tokens": len(prompt_ids), "tokens_written": writer.written,
        "conditions": {name: summarize(g, tokenizer, resolved.answer, _words(ctx, req.run_id)) for name, g in done.items()},
    }
    a, u = summary["conditions"][ABLATED], summary["conditions"][UNABLATED]
    summary["answer_changed"] = not _same_answer(a["answer"], u["answer"])
    summary["first_divergence"] = _first_divergence(done[ABLATED].token_ids, done[UNABLATED].token_ids)
    if req.target_token_id is not None:
        summary["target"] = target_report(req.target_token_id, tokenizer, done)
    return summary


def _run_config(ctx: JobContext, run_id: int) -> dict | None:
    with ctx.session() as s:
        run = s.get(Run, run_id)
        return dict(run.config or {}) if run is not None else None


def _words(ctx: JobContext, run_id: int) -> tuple[str, ...]:
    with ctx.session() as s:
        return run_hesitation_words(s.get(Run, run_id))


def target_report(token_id: int, tokenizer: Any, done: dict[str, Generated]) -> dict[str, Any]:
    """The watched token per condition: its probability as the first generated token, whether it was that
    token, and whether it appears anywhere in the generated text."""
    out: dict[str, Any] = {"token_id": token_id, "text": storable(tokenizer.decode([token_id]))}
    for name, gen in done.items():
        out[name] = {"p_first": gen.watched[0][0] if gen.watched else None,
                     "first": bool(gen.token_ids) and gen.token_ids[0] == token_id,
                     "produced": token_id in gen.token_ids}
    return out


def _check_ids(ids: Sequence[int], model: AdapterModel) -> None:
    """Refuse token ids outside the model's embedding table (explicit ids from a request)."""
    vocab = model.hf.get_input_embeddings().num_embeddings
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise AblationRequestError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")


# ----------------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class _Group:
    """Conditions generated together in one lockstep batch (they share the model mode)."""

    mode: MLPMode
    tracks: tuple[Track, ...]


def experiment_plan(design: str, ivs: Sequence[Intervention], sel: ResolvedSelection, n_layers: int,
                    compare: Sequence[str]) -> list[_Group]:
    """Which conditions an experiment generates, grouped by model mode."""
    if design == "necessity":
        groups = [_Group("adapted", tuple(ablation_tracks(ivs)))]
    else:  # sufficiency: only the set's features on top of the hybrid (+ decoder biases)
        keep = ResolvedSelection(**{**sel.model_dump(), "complement": True, "mode": "zero"})
        groups = [_Group("adapted", (Track(SET_ONLY, tuple(build_interventions(keep, n_layers))),
                                     Track(REFERENCE, (), follows=SET_ONLY), Track(UNABLATED))),
                  _Group("hybrid", (Track(HYBRID),))]
    have = {t.name for g in groups for t in g.tracks}
    groups += [_Group(mode, (Track(mode),)) for mode in dict.fromkeys(compare) if mode not in have]
    return groups


def _round_robin(problem_ids: Sequence[str]) -> list[str]:
    """Ids reordered to alternate between families (``add-…``, ``sub-…``, ...), each family's order kept."""
    by_family: dict[str, list[str]] = {}
    for pid in problem_ids:
        by_family.setdefault(pid.split("-", 1)[0], []).append(pid)
    queues = list(by_family.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _organism_items(run: Run, limit: int, settings: Settings) -> list[PromptItem]:
    """Held-out problems of the organism the run's target belongs to (its ``organism.json``), ``limit`` of them
    (0: all) taken in turn from each task family, so that a small experiment still covers every family."""
    from training.organism.build import MANIFEST
    from training.organism.tasks import problem_from_id
    from worker.models_cache import resolve_model

    target = Path(resolve_model(run.target_model, settings, "target"))
    for manifest in (target / MANIFEST, target.parent / MANIFEST):
        if manifest.is_file():
            ids = _round_robin(json.loads(manifest.read_text())["heldout_ids"])
            problems = [problem_from_id(i) for i in (ids[:limit] if limit else ids)]
            return [PromptItem(prompt=p.text, answer=p.answer) for p in problems]
    raise AblationRequestError(f"run {run.id}'s target {run.target_model} is not an organism (no {MANIFEST}); "
                               "give items, jsonl or prompt_ids instead")


def _experiment_prompts(ctx: JobContext, resolved: ResolvedExperiment, tokenizer: Any) -> list[tuple[list[int], str | None, str]]:
    """(token ids, known answer, text shown) per prompt, in request order."""
    req = resolved.request
    if req.prompt_ids is not None:
        with ctx.session() as s:
            rows = {p.id: p for p in s.scalars(select(Prompt).where(Prompt.id.in_(req.prompt_ids)))}
        return [([int(t) for t in rows[i].token_ids], rows[i].answer, rows[i].text) for i in req.prompt_ids]
    if req.items is not None:
        items = req.items
    elif req.jsonl is not None:
        items = load_jsonl(req.jsonl)
    else:
        with ctx.session() as s:
            run = s.get(Run, req.run_id)
        items = _organism_items(run, req.organism_heldout or 0, ctx.job_settings())
    config = _run_config(ctx, req.run_id)
    return [(encode(tokenizer, format_free_text(tokenizer, it.prompt, chat=req.chat, config=config)), it.answer,
             it.prompt) for it in items]


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    qs = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "p10": qs[0], "p90": qs[-1],
            "min": min(values), "max": max(values)}


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per condition: response-length and hesitation distributions, hesitation rate, accuracy, mean KL."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["condition"], []).append(r)
    out: dict[str, Any] = {}
    for cond, rs in by.items():
        known = [r["correct"] for r in rs if r["correct"] is not None]
        kls = [r["meta"]["mean_kl"] for r in rs if r["meta"].get("mean_kl") is not None]
        out[cond] = {
            "n": len(rs),
            "response_length": _quantiles([r["response_len"] for r in rs]),
            "hesitations": _quantiles([r["hesitations"] for r in rs]),
            "hesitation_rate": sum(r["hesitations"] > 0 for r in rs) / len(rs),
            "accuracy": sum(known) / len(known) if known else None,
            "mean_kl": statistics.fmean(kls) if kls else None,
        }
    if UNABLATED in by:
        base = {r["prompt_idx"]: r["answer"] for r in by[UNABLATED]}
        for cond, rs in by.items():
            if cond != UNABLATED:
                out[cond]["answer_changed_rate"] = sum(not _same_answer(r["answer"], base.get(r["prompt_idx"]))
                                                       for r in rs) / len(rs)
    return out


@register("experiment", ExperimentPayload)
def experiment(ctx: JobContext) -> dict[str, Any]:
    """Run a stored experiment over its prompt set; rows are written prompt by prompt."""
    return _tracked(ctx, Experiment, ctx.payload.experiment_id, ExperimentRow, "experiment_id",
                    ResolvedExperiment, _run_experiment)


def _run_experiment(ctx: JobContext, experiment_id: int, resolved: ResolvedExperiment) -> dict[str, Any]:
    req = resolved.request
    model, tokenizer = _model(ctx, req.run_id)
    settings = sampling_settings(req.generation, model, tokenizer)
    prompts = _experiment_prompts(ctx, resolved, tokenizer)
    for i, (ids, _, text) in enumerate(prompts):
        try:
            check_prompt_length(len(ids), settings.context_length)
        except AblationRequestError as exc:
            raise AblationRequestError(f"prompt {i} ({text[:60]!r}): {exc}") from None
    ivs = build_interventions(resolved.selection, model.n_layers)
    words = _words(ctx, req.run_id)
    groups = experiment_plan(req.design, ivs, resolved.selection, model.n_layers, req.compare)
    all_rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), req.batch_size):
        ctx.check()
        chunk = prompts[start:start + req.batch_size]
        done: list[dict[str, Generated]] = [{} for _ in chunk]
        for g in groups:
            _drain(lockstep_prompts(model, [ids for ids, _, _ in chunk], g.tracks, settings, mode=g.mode), ctx,
                   _accumulate(done))
        rows = []
        for offset, ((_, answer, text), gens) in enumerate(zip(chunk, done, strict=True)):
            for cond, gen in gens.items():
                s = summarize(gen, tokenizer, answer, words)
                rows.append({"experiment_id": experiment_id, "prompt_idx": start + offset, "condition": cond,
                             "response_len": s["response_length"], "hesitations": s["hesitations"],
                             "correct": s["correct"], "answer": s["answer"],
                             "meta": {"token_ids": gen.token_ids, "stop": gen.stop, "mean_kl": s.get("mean_kl"),
                                      "prompt": storable(text)[:PROMPT_SHOWN_MAX]}})
        with ctx.session() as session:
            upsert(session, ExperimentRow, rows)
        all_rows += rows
        ctx.progress(start + len(chunk), len(prompts), f"{start + len(chunk)}/{len(prompts)} prompts")
    summary = {"design": req.design, "n_prompts": len(prompts), "seconds": time.perf_counter() - t0,
               "conditions": aggregate(all_rows)}
    log.info("experiment %s: %d prompts in %.1f s", experiment_id, len(prompts), summary["seconds"])
    return summary
