"""A batch experiment: per-condition distributions and the per-prompt table."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Experiment, ExperimentRow, FeatureSet, Job, utcnow
from app.web.data.common import BadInput, NotFound, RunRef, get_run, hesitation_set, run_ref

BASELINE_FIRST = ("baseline", "unablated", "none", "adapted", "hybrid", "target")
DONE_STATES = ("done", "succeeded", "failed", "cancelled")


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
    done: bool = Field(description="False while the worker may still add rows (the page refreshes itself).")
    job_id: int | None = None
    job_status: str | None = None
    progress: dict[str, Any] | None = Field(None, description="The job's {done, total, message} while it runs.")
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
    job = session.get(Job, e.job_id) if e.job_id else None
    job_status = (job.status.value if hasattr(job.status, "value") else str(job.status)) if job else None
    done = e.status in DONE_STATES or job_status in DONE_STATES
    return ExperimentPage(
        run=run_ref(run), id=e.id, name=e.name, status=e.status, done=done, job_id=e.job_id, job_status=job_status,
        progress=job.progress if job is not None and not done else None, request=e.request or {}, summary=e.summary,
        error=e.error, created=e.created, finished=e.finished, conditions=conditions,
        rows=[PromptRow(prompt_idx=i, prompt=texts.get(i), cells=table[i]) for i in sorted(table)],
    )


class ExperimentForm(BaseModel):
    """What the experiment form posts (and the JSON API takes): the same request the CLI submits.

    The intervention is a stored feature set (optionally only some roles) and/or explicit ``features``
    (``layer:index`` pairs); the prompts are the organism's held-out problems (``n_prompts``, taken in turn
    from each family) or ``prompts``: one per line, ``prompt | answer`` (the answer optional).
    """

    name: str | None = Field(None, max_length=200)
    feature_set: str | None = Field(None, max_length=200, description="A stored set's name.")
    roles: list[str] = Field([], description="Only the set's members with these roles (e.g. output).")
    features: str = Field("", max_length=200_000, description="layer:index pairs, besides or instead of a set.")
    design: Literal["necessity", "sufficiency"] = "necessity"
    n_prompts: int | None = Field(None, ge=0, le=10_000, description="Organism held-out problems (0 = all).")
    prompts: str = Field("", max_length=1_000_000, description="One prompt per line: 'prompt | answer'.")
    mode: Literal["zero", "scale", "clamp"] = "zero"
    value: float | None = None
    positions: Literal["all", "prompt", "generated"] = "all"
    max_new_tokens: int = Field(96, ge=1)

    @field_validator("name", "feature_set", "value", "n_prompts", mode="before")
    @classmethod
    def _blank(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("roles", mode="before")
    @classmethod
    def _roles(cls, v: Any) -> Any:
        return [r for r in v if isinstance(r, str) and r.strip()] if isinstance(v, list) else v


def experiment_request(run_id: int, form: ExperimentForm) -> dict[str, Any]:
    """The form as the store's ``ExperimentRequest``."""
    from app.web.data.ablations import parse_features

    features = parse_features(form.features) if form.features.strip() else []
    if not features and form.feature_set is None:
        raise BadInput("choose a feature set or give features (layer:index)", 422)
    request: dict[str, Any] = {
        "run_id": run_id, "design": form.design, "features": [list(f) for f in features], "mode": form.mode,
        "value": None if form.mode == "zero" else form.value, "positions": form.positions,
        "generation": {"max_new_tokens": form.max_new_tokens},
    }
    if form.feature_set is not None:
        request["feature_set"] = form.feature_set
        if form.roles:
            request["roles"] = form.roles
    lines = [ln.strip() for ln in form.prompts.replace("\r\n", "\n").split("\n") if ln.strip()]
    if lines:
        items = []
        for ln in lines:
            prompt, _, answer = ln.partition(" | ")
            items.append({"prompt": prompt.strip(), "answer": answer.strip() or None})
        request["items"] = items
    else:
        request["organism_heldout"] = 200 if form.n_prompts is None else form.n_prompts
    what = form.feature_set or f"{len(features)} features"
    label = form.design if form.mode == "zero" else f"{form.design}, {form.mode} {form.value}"
    request["name"] = form.name or f"{label}: {what}"
    return request


def create_experiment(session: Session, run_key: str | int, form: ExperimentForm, settings: Any = None) -> int:
    """Validate, store and queue an experiment in one transaction (a refused request stores nothing)."""
    from app.db.requests import AblationLimits, AblationRequestError, submit_experiment

    run = get_run(session, run_key)
    limits = AblationLimits.from_settings(settings) if settings is not None else AblationLimits()
    try:
        experiment_id, _ = submit_experiment(session, experiment_request(run.id, form), limits=limits)
        session.commit()
    except AblationRequestError as exc:
        session.rollback()
        raise BadInput(str(exc), exc.status_code) from None
    except BaseException:
        session.rollback()
        raise
    return experiment_id


def cancel_experiment(session: Session, run_key: str | int, experiment_id: int) -> bool:
    """Cancel an experiment's job (the worker stops between batches); a waiting one is marked at once."""
    from app.db import queue

    run = get_run(session, run_key)
    e = session.get(Experiment, experiment_id)
    if e is None or e.run_id != run.id:
        raise NotFound(f"No experiment {experiment_id} in run {run.id}.")
    if e.status in DONE_STATES:
        return False
    changed = queue.cancel(session, e.job_id) if e.job_id is not None else False
    if e.status == "todo":
        e.status, e.finished = "cancelled", utcnow()
        changed = True
    session.commit()
    return changed


class ExperimentChoices(BaseModel):
    """What the experiment form offers for a run: its feature sets, their roles, and the default set."""

    sets: list[str]
    roles: dict[str, list[str]]
    default_set: str | None
    organism: bool


def experiment_choices(session: Session, run: Any) -> ExperimentChoices:
    from app.db.schema import FeatureSetMember

    sets = session.scalars(select(FeatureSet).where(FeatureSet.run_id == run.id).order_by(FeatureSet.id)).all()
    roles = {s.name: sorted({r for (r,) in session.execute(select(FeatureSetMember.role).where(
        FeatureSetMember.set_id == s.id).distinct()) if r}) for s in sets}
    hset = hesitation_set(session, run.id)
    return ExperimentChoices(sets=[s.name for s in sets], roles=roles, default_set=hset.name if hset else None,
                             organism=str(run.target_model).startswith("organism:"))
