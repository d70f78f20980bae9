"""The ``label`` job: label a run's features with the built-in rules or an LLM judge (app/labels/).

The collect job labels every feature with the built-in rules when it has written them, so a ``label`` job is
for an LLM judge (``labeler: llm``; endpoint, model and key from the worker's settings, never the payload) or
for relabelling.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.labels import BUILTIN
from app.labels.run import label_run
from worker.handlers import JobContext, register


class LabelPayload(BaseModel):
    run_id: int
    labeler: Literal["builtin", "llm"] = BUILTIN
    layers: list[int] | None = Field(None, max_length=10_000, description="Only these layers (default: all).")
    per_layer: int | None = Field(None, ge=1, le=1_000_000, description="Sample this many alive features per layer "
                                  "(seed 42; the paper's classification: 250). Default: every feature.")
    alive_only: bool = Field(False, description="Leave out features that never fired.")
    resume: bool = Field(True, description="LLM: skip features this model already labelled.")


def _llm(ctx: JobContext):
    from app.labels.llm import LLMLabeler

    return LLMLabeler.from_settings(ctx.job_settings())


@register("label", LabelPayload)
def label_job(ctx: JobContext) -> dict:
    p: LabelPayload = ctx.payload
    llm = _llm(ctx) if p.labeler == "llm" else None
    try:
        return label_run(ctx.engine, p.run_id, labeler=p.labeler, data_dir=ctx.job_settings().resolved_data_dir,
                         layers=p.layers, per_layer=p.per_layer, alive_only=p.alive_only, resume=p.resume, llm=llm,
                         progress=ctx.progress, check=ctx.check)
    finally:
        if llm is not None:
            llm.close()
