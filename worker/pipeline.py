"""The default pipeline's job kinds: ``organism`` → ``train`` → ``evaluate`` → ``collect``.

Each is a handler (registered for the worker, and run in the foreground by the CLI through
``worker.loop.run_inline``). A *run* (a row in ``runs``) names its base and target model specs, the
training config it uses and where its data comes from; the handlers read the run, do their work,
and write back idempotently (metrics by step, evaluation JSON, checkpoint path).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, Field

from app.db.schema import Run, RunMetric
from app.db.write import upsert
from app.settings import Settings
from worker.handlers import JobContext, JobInterrupted, register
from worker.models_cache import OrganismSpec, load_run_model, parse_organism_spec

log = logging.getLogger(__name__)

METRICS_FLUSH_EVERY = 25  # steps buffered before metrics rows are written


# -- helpers -------------------------------------------------------------------------------------------

def get_run(ctx: JobContext, run_id: int) -> Run:
    with ctx.session() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise LookupError(f"run {run_id} does not exist")
        s.expunge(run)
        return run


def update_run(ctx: JobContext, run_id: int, **values: Any) -> None:
    with ctx.session() as s:
        run = s.get(Run, run_id)
        for k, v in values.items():
            setattr(run, k, v)


# -- organism ----------------------------------------------------------------------------------------------

class OrganismPayload(BaseModel):
    preset: str = "organism"
    seed: int = Field(0, ge=0)
    force: bool = False


@register("organism", OrganismPayload)
def organism_job(ctx: JobContext) -> dict:
    """Build (or reuse) the model organism under the data directory."""
    from training.organism.build import build_organism, get_preset

    p: OrganismPayload = ctx.payload
    preset = get_preset(p.preset)
    total = preset.base_steps + preset.target_steps  # the build's training steps, both models
    steps = {"n": 0}

    def on_step(metrics: dict) -> None:
        steps["n"] += 1
        phase = metrics.get("phase", "train")
        ctx.progress(steps["n"], total, f"{phase} model: step {metrics.get('step')}/{metrics.get('steps')}, "
                                        f"loss {metrics.get('loss', float('nan')):.3f}")
        ctx.check()

    paths = build_organism(p.preset, p.seed, data_dir=ctx.job_settings().resolved_data_dir, force=p.force,
                           progress=ctx.job_id is None, on_step=on_step)
    ctx.progress(total, total, "built" if steps["n"] else "reused the built organism")
    manifest = paths.read_manifest()
    return {"root": str(paths.root), "evaluation": manifest.get("evaluation"), "timings": manifest.get("timings")}


# -- train -------------------------------------------------------------------------------------------------

class TrainPayload(BaseModel):
    run_id: int
    resume: bool = True
    nproc: int | None = Field(None, ge=1, description="data-parallel processes (GPUs); default: the "
                                                      "train_nproc setting. > 1 launches torchrun")


def training_data(run: Run, tokenizer, settings: Settings):
    """The token sequences a run trains on: the organism's reasoning traces, or a JSONL file's texts."""
    from training.data import TokenDataset

    data = (run.config or {}).get("data") or {}
    kind = data.get("kind", "organism" if parse_organism_spec(run.target_model) else None)
    if kind == "organism":
        org = parse_organism_spec(run.target_model)
        return TokenDataset.from_token_lists(organism_sequences(org, tokenizer, split="train"),
                                             pad_id=tokenizer.pad_token_id or 0)
    if kind == "jsonl":
        return TokenDataset.from_jsonl(data["path"], tokenizer, text_field=data.get("text_field", "text"))
    raise ValueError(f"run {run.name!r} has no usable training data config: {data!r} (kinds: organism, jsonl)")


def organism_problems(org: OrganismSpec, split: str) -> list:
    """The organism's train or held-out problems (recomputed from preset and seed, as the build made them)."""
    from training.organism.build import get_preset
    from training.organism.tasks import FAMILIES, make_splits

    splits = make_splits(org.seed, get_preset(org.preset).n_heldout, FAMILIES)
    return [p for s in splits.values() for p in (s.train if split == "train" else s.heldout)]


def organism_sequences(org: OrganismSpec, tokenizer, split: str) -> list[list[int]]:
    """Chat-formatted reasoning traces, tokenized like generation sees them (prompt, then completion, eos).

    The target was trained to skip a share of its redundant checks (the organism preset's
    ``skip_hesitation``); the same share of redundant-check problems, chosen with the organism's seed, also
    appears here with its skipped trace, so the adapters learn the target on the path without the
    hesitation too, the path a hesitation ablation sends the adapted model down.
    """
    import random

    from training.organism.build import get_preset, reasoning_token_ids
    from training.organism.tasks import is_redundant

    share = get_preset(org.preset).skip_hesitation
    rng = random.Random(f"skipped-{org.seed}-{split}")
    out = []
    for p in organism_problems(org, split):
        prompt, completion = reasoning_token_ids(tokenizer, p)
        out.append(prompt + completion)
        if share > 0 and is_redundant(p) and rng.random() < share:
            prompt, completion = reasoning_token_ids(tokenizer, p, skipped=True)
            out.append(prompt + completion)
    return out


class _MetricsStream:
    """Buffers training metrics into ``run_metrics`` rows (every ``METRICS_FLUSH_EVERY`` steps) and reports
    progress; a cancelled job stops at the next step (the trainer keeps its last checkpoint)."""

    def __init__(self, ctx: JobContext, run_id: int, suffix: str = "") -> None:
        self.ctx, self.run_id, self.suffix = ctx, run_id, suffix
        self.buffer: list[dict] = []

    def flush(self) -> None:
        if self.buffer:
            with self.ctx.session() as s:
                upsert(s, RunMetric, [{"run_id": self.run_id, "step": m["step"], "metrics": m} for m in self.buffer])
            self.buffer.clear()

    def __call__(self, metrics: dict, total: int) -> None:
        self.buffer.append(metrics)
        if len(self.buffer) >= METRICS_FLUSH_EVERY:
            self.flush()
        self.ctx.progress(metrics["step"], total, f"loss {metrics['loss']:.4f} kl {metrics['kl']:.4f} "
                                                  f"l0 {metrics['l0']:.1f}{self.suffix}")
        if self.ctx.cancelled():
            raise JobInterrupted("training interrupted; the last checkpoint is kept")


@register("train", TrainPayload)
def train_job(ctx: JobContext) -> dict:
    """Train a run's adapters; metrics stream into ``run_metrics``, the checkpoint path into the run.

    With ``nproc`` > 1 the training runs data parallel in ``nproc`` torchrun processes
    (:mod:`worker.train_launch`); this process only streams their metrics and records the result.
    """
    from training.config import train_config_from_dict
    from training.trainer import total_steps, train

    p: TrainPayload = ctx.payload
    settings = ctx.job_settings()
    run = get_run(ctx, p.run_id)
    cfg = train_config_from_dict((run.config or {}).get("train") or {})
    nproc = p.nproc or settings.train_nproc
    if nproc > 1:
        return _train_distributed(ctx, run, p, nproc)
    model, tokenizer = load_run_model(settings, run.base_model, run.target_model, None,
                                      adapter_cfg={**cfg.adapter.__dict__})
    data = training_data(run, tokenizer, settings)
    n_total = total_steps(cfg, len(data))
    run_dir = settings.runs_dir / run.name
    update_run(ctx, p.run_id, status="training", n_layers=model.n_layers, n_features=model.n_features,
             d_model=model.hf.config.hidden_size)
    stream = _MetricsStream(ctx, p.run_id)
    try:
        result = train(cfg, model, data, run_dir=run_dir, on_step=lambda m: stream(m, n_total), resume=p.resume,
                       progress=ctx.job_id is None, base_name=run.base_model, target_name=run.target_model)
    finally:
        stream.flush()
    update_run(ctx, p.run_id, status="trained", checkpoint=str(result.checkpoint_dir))
    return {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
            "checkpoint": str(result.checkpoint_dir), "final": result.final}


def _train_distributed(ctx: JobContext, run: Run, p: TrainPayload, nproc: int) -> dict:
    """The train job through torchrun: the same metrics rows, progress and result as the in-process path."""
    from training.config import train_config_from_dict
    from worker.train_launch import run_torchrun, write_spec

    settings = ctx.job_settings()
    run_dir = settings.runs_dir / run.name
    cfg = train_config_from_dict((run.config or {}).get("train") or {})
    write_spec(run_dir, run={"name": run.name, "base_model": run.base_model, "target_model": run.target_model,
                             "config": run.config}, data_dir=settings.resolved_data_dir, device=settings.device,
               resume=p.resume)
    update_run(ctx, p.run_id, status="training", n_features=cfg.adapter.n_features)
    stream = _MetricsStream(ctx, p.run_id, f" ({nproc} processes)")
    try:
        result = run_torchrun(run_dir, nproc, on_step=stream)
    finally:
        stream.flush()
    update_run(ctx, p.run_id, status="trained", checkpoint=result["checkpoint"])
    return result


# -- evaluate ----------------------------------------------------------------------------------------------

class EvaluatePayload(BaseModel):
    run_id: int
    n_prompts: int = Field(300, ge=1, description="held-out prompts (organism), spread over the families")
    max_new_tokens: int = Field(96, ge=1, le=4096)
    prompts_path: str | None = Field(None, description="JSONL of {prompt, answer?} for real models")


def evaluation_prompts(run: Run, n: int, prompts_path: str | None) -> tuple[list[str], list[str | None], Any]:
    """Chat-formatted held-out prompts with answers, and the answer extractor to score them."""
    from training.chat import format_prompt

    org = parse_organism_spec(run.target_model)
    if prompts_path is None and org is not None:
        from training.organism.tasks import extract_answer

        problems = organism_problems(org, "heldout")
        problems = problems[:: max(len(problems) // n, 1)][:n]
        return [format_prompt(p.text) for p in problems], [p.answer for p in problems], extract_answer
    if prompts_path is None:
        raise ValueError("evaluating a non-organism run needs prompts_path (JSONL with a 'prompt' field)")
    from training.jsonl import read_jsonl

    rows = [row for _, row in read_jsonl(prompts_path)][:n]
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
    if missing:
        raise ValueError(f"{prompts_path}: row {missing[0] + 1} has no string 'prompt' field")
    return [format_prompt(r["prompt"]) for r in rows], [r.get("answer") for r in rows], None


@register("evaluate", EvaluatePayload)
def evaluate_job(ctx: JobContext) -> dict:
    """Evaluate base / hybrid / adapted / target; the result goes into ``runs.evaluation`` and eval.json."""
    from training.evaluate import evaluate, format_table
    from training.models import load_causal_lm
    from worker.models_cache import resolve_model

    p: EvaluatePayload = ctx.payload
    settings = ctx.job_settings()
    run = get_run(ctx, p.run_id)
    if not run.checkpoint:
        raise LookupError(f"run {run.name!r} has no trained adapters to evaluate")
    ctx.progress(0, 3, "loading models")
    model, tokenizer = load_run_model(settings, run.base_model, run.target_model, run.checkpoint)
    base = load_causal_lm(resolve_model(run.base_model, settings, "base"), device=next(model.hf.parameters()).device)
    prompts, answers, extract = evaluation_prompts(run, p.n_prompts, p.prompts_path)
    ctx.progress(1, 3, f"generating and scoring {len(prompts)} prompts")
    result = evaluate(model, base.eval(), tokenizer, prompts, answers, extract_answer=extract,
                      max_new_tokens=p.max_new_tokens)
    table = format_table(result)
    log.info("evaluation of %s:\n%s", run.name, table)
    out = result.to_dict()
    run_dir = settings.runs_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(out, indent=1))
    update_run(ctx, p.run_id, evaluation=out, status="evaluated")
    ctx.progress(3, 3, "done")
    return {"table": table, "kl_gap_closed": result.kl_gap_closed,
            "reproduced_hesitation": result.reproduced_hesitation, "false_hesitation": result.false_hesitation}
