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
from worker.handlers import JobContext, JobInterrupted, register
from worker.models_cache import load_run_model
from worker.run_data import (  # noqa: F401 (organism_problems, organism_sequences: imported from here elsewhere)
    heldout_sequences,
    organism_problems,
    organism_sequences,
    require_target,
    run_chat_format,
    run_prompts,
    training_data,
)

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


def evaluated_status(current: str | None) -> str:
    """The run status after an evaluation: ``evaluated``, unless the run is ``collected`` already (the pipelines
    collect before they evaluate, so that the feature pages come first; the status keeps saying how far it got)."""
    return current if current == "collected" else "evaluated"


# -- organism ----------------------------------------------------------------------------------------------

class OrganismPayload(BaseModel):
    preset: str = "organism"
    seed: int = Field(0, ge=0)
    force: bool = False


@register("organism", OrganismPayload)
def organism_job(ctx: JobContext) -> dict:
    """Build (or reuse) the model organism under the data directory."""
    from training.organism.build import build_organism, build_steps, get_preset

    p: OrganismPayload = ctx.payload
    total = build_steps(get_preset(p.preset))  # training steps of both models, then the evaluation runs
    steps = {"n": 0}

    def on_step(metrics: dict) -> None:
        steps["n"] += 1
        phase = metrics.get("phase", "train")
        if phase == "evaluate":
            message = f"evaluating on held-out problems: {metrics.get('what')} done ({metrics.get('step')}/{metrics.get('steps')})"
        else:
            message = (f"{phase} model: step {metrics.get('step')}/{metrics.get('steps')}, "
                       f"loss {metrics.get('loss', float('nan')):.3f}")
        ctx.progress(steps["n"], total, message)
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
    config = dict(run.config or {})
    config.setdefault("chat", run_chat_format(run, tokenizer).to_config())  # the run keeps its chat format
    update_run(ctx, p.run_id, status="training", n_layers=model.n_layers, n_features=model.n_features,
               d_model=model.hf.config.hidden_size, config=config)
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
    n_prompts: int = Field(300, ge=1, description="held-out prompts generated from (organism: spread over the families)")
    n_texts: int = Field(300, ge=1, description="held-out texts KL and NMSE are measured on")
    max_new_tokens: int = Field(96, ge=1, le=4096)
    prompts_path: str | None = Field(None, description="JSONL of {prompt, answer?} (default: the run's, else the "
                                                       "prompts of its held-out texts)")
    eval_path: str | None = Field(None, description="JSONL of held-out {text} (default: the run's held-out split)")


@register("evaluate", EvaluatePayload)
def evaluate_job(ctx: JobContext) -> dict:
    """Evaluate base / hybrid / adapted / target; the result goes into ``runs.evaluation`` and eval.json.

    KL, gap closed and NMSE on the run's held-out texts; hesitation, length and accuracy on greedy
    generations from its prompts (:mod:`worker.run_data`); the result says which data each came from.
    """
    from training.config import train_config_from_dict
    from training.evaluate import evaluate, format_table
    from training.hesitation import words_from_config
    from training.models import load_causal_lm
    from worker.models_cache import get_run_model, resolve_model

    p: EvaluatePayload = ctx.payload
    settings = ctx.job_settings()
    run = get_run(ctx, p.run_id)
    if not run.checkpoint:
        raise LookupError(f"run {run.name!r} has no trained adapters to evaluate")
    ctx.progress(0, 3, "loading models")
    model, tokenizer = get_run_model(settings, p.run_id)
    require_target(run, model, "the evaluation")
    base = None
    if not _base_in_checkpoint(run):
        base = load_causal_lm(resolve_model(run.base_model, settings, "base"),
                              device=next(model.hf.parameters()).device).eval()
    max_len = train_config_from_dict((run.config or {}).get("train") or {}).max_seq_len
    heldout, texts_from = heldout_sequences(run, tokenizer, n=p.n_texts, max_len=max_len, eval_path=p.eval_path)
    prompts = run_prompts(run, tokenizer, prompts_path=p.prompts_path, n=p.n_prompts)
    ctx.progress(1, 3, f"{len(heldout)} held-out texts; generating from {len(prompts.texts)} prompts")
    result = evaluate(model, base, tokenizer, prompts.texts, prompts.answers, heldout=heldout,
                      score_answer=prompts.score, max_new_tokens=p.max_new_tokens,
                      hesitation_words=words_from_config(run.config),
                      data={"texts": texts_from, "prompts": prompts.description})
    table = format_table(result)
    log.info("evaluation of %s: KL gap closed %.3f on %d held-out texts; %d prompts generated from", run.name,
             result.kl_gap_closed, result.n_texts, result.n_prompts)
    out = result.to_dict()
    run_dir = settings.runs_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(out, indent=1))
    update_run(ctx, p.run_id, evaluation=out, status=evaluated_status(get_run(ctx, p.run_id).status))
    ctx.progress(3, 3, "done")
    return {"table": table, "kl_gap_closed": result.kl_gap_closed,
            "reproduced_hesitation": result.reproduced_hesitation, "false_hesitation": result.false_hesitation,
            "data": result.data}


def _base_in_checkpoint(run: Run) -> bool:
    """An imported run in the released format whose base model is not named: its base MLPs live in the
    checkpoint only, so the evaluation has no base row."""
    imported = (run.config or {}).get("imported") or {}
    return bool(imported) and imported.get("base_model") is None and imported.get("format") == "reference"
