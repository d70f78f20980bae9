"""Tiny job handlers for the worker tests; importing this module registers them.

``test.write`` writes one ``run_metrics`` row per step with an upsert (so a re-run replaces, never
duplicates) and can then hold, polling for cancellation, to be killed or stopped mid-job.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from app.db.schema import RunMetric
from app.db.write import upsert
from worker.handlers import JobContext, register

HOLD_POLL_S = 0.02  # seconds between cancellation checks while holding


class WritePayload(BaseModel):
    run_id: int
    steps: int = 3
    hold_on_attempts: list[int] = []  # attempts on which to hold after writing
    hold_s: float = 30.0


@register("test.write", WritePayload)
def write_metrics(ctx: JobContext) -> dict:
    p: WritePayload = ctx.payload
    with ctx.session() as session:
        rows = [{"run_id": p.run_id, "step": i, "metrics": {"attempt": ctx.attempt}} for i in range(p.steps)]
        upsert(session, RunMetric, rows)
    ctx.progress(p.steps, p.steps, "written")
    if ctx.attempt in p.hold_on_attempts:
        deadline = time.monotonic() + p.hold_s
        while time.monotonic() < deadline:
            ctx.check()
            time.sleep(HOLD_POLL_S)
    return {"steps": p.steps, "attempt": ctx.attempt}


class FailPayload(BaseModel):
    message: str = "boom"


@register("test.fail", FailPayload)
def always_fail(ctx: JobContext) -> None:
    raise RuntimeError(ctx.payload.message)


class StepsPayload(BaseModel):
    run_id: int
    steps: int = 30
    step_s: float = 0.1


@register("test.steps", StepsPayload)
def write_steps(ctx: JobContext) -> dict:
    """One ``run_metrics`` row per step, each in its own transaction, ``step_s`` apart: a database outage
    during the job hits one of these writes (upserts, so a re-run replaces them)."""
    p: StepsPayload = ctx.payload
    for i in range(p.steps):
        with ctx.session() as session:
            upsert(session, RunMetric, [{"run_id": p.run_id, "step": i, "metrics": {"attempt": ctx.attempt}}])
        ctx.progress(i + 1, p.steps, "writing")
        ctx.check()
        time.sleep(p.step_s)
    return {"steps": p.steps, "attempt": ctx.attempt}
