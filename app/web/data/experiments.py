"""A batch experiment: per-condition distributions and the per-prompt table."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Experiment, ExperimentRow
from app.web.data.common import NotFound, RunRef, get_run, run_ref

BASELINE_FIRST = ("baseline", "unablated", "none", "adapted", "hybrid", "target")


class ConditionStats(BaseModel):
    name: str
    n: int
    response_len: list[int | None]
    hesitations: list[int | None]
    correct: list[bool | None]
    mean_response_len: float | None
    mean_hesitations: float | None
    accuracy: float | None


class PromptRow(BaseModel):
    prompt_idx: int
    prompt: str | None = None  # the prompt's text (rows written before it was recorded have none)
    cells: dict[str, dict[str, Any]]


class ExperimentPage(BaseModel):
    run: RunRef
    id: int
    name: str
    status: str
    request: dict[str, Any]
    summary: dict[str, Any] | None
    error: str | None
    created: datetime | None
    finished: datetime | None
    conditions: list[ConditionStats]
    rows: list[PromptRow]


def _mean(xs: list[Any]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def experiment_page(session: Session, run_key: str | int, experiment_id: int) -> ExperimentPage:
    run = get_run(session, run_key)
    e = session.get(Experiment, experiment_id)
    if e is None or e.run_id != run.id:
        raise NotFound(f"No experiment {experiment_id} in run {run.id}.")
    rows = session.scalars(
        select(ExperimentRow).where(ExperimentRow.experiment_id == e.id)
        .order_by(ExperimentRow.prompt_idx, ExperimentRow.condition)
    ).all()
    by_cond: dict[str, list[ExperimentRow]] = {}
    table: dict[int, dict[str, dict[str, Any]]] = {}
    texts: dict[int, str] = {}
    for r in rows:
        if isinstance(r.meta, dict) and isinstance(r.meta.get("prompt"), str):
            texts.setdefault(r.prompt_idx, r.meta["prompt"])
        by_cond.setdefault(r.condition, []).append(r)
        table.setdefault(r.prompt_idx, {})[r.condition] = {
            "response_len": r.response_len, "hesitations": r.hesitations, "correct": r.correct,
            "answer": r.answer,
        }
    names = sorted(by_cond, key=lambda c: (BASELINE_FIRST.index(c) if c in BASELINE_FIRST else len(BASELINE_FIRST), c))
    conditions = [
        ConditionStats(
            name=c, n=len(rs), response_len=[r.response_len for r in rs], hesitations=[r.hesitations for r in rs],
            correct=[r.correct for r in rs], mean_response_len=_mean([r.response_len for r in rs]),
            mean_hesitations=_mean([r.hesitations for r in rs]),
            accuracy=_mean([float(r.correct) if r.correct is not None else None for r in rs]),
        )
        for c, rs in ((c, by_cond[c]) for c in names)
    ]
    return ExperimentPage(
        run=run_ref(run), id=e.id, name=e.name, status=e.status, request=e.request or {}, summary=e.summary,
        error=e.error, created=e.created, finished=e.finished, conditions=conditions,
        rows=[PromptRow(prompt_idx=i, prompt=texts.get(i), cells=table[i]) for i in sorted(table)],
    )
