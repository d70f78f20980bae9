"""Feature sets and the study behind them: the hesitation study's finding on the run page, and a set's own page.

The study stores its figures with the set (``feature_sets.summary``, the hesitation job's result), so a page
reads the finding from one row: the set's size and share of all features, the share of hesitation tokens its
removal takes away on held-out prompts, accuracy and length before and after, the random-feature control,
the per-family figures and how the set grew. The members come with their role and the token their logit
lens promotes most.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import and_, case, func, literal, select
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureSet, FeatureSetMember, Graph
from app.web.data.common import (
    NotFound,
    RunRef,
    as_float,
    get_run,
    hesitation_set,
    run_ref,
    run_vocab,
)
from app.web.data.feature import top_token

ROLE_ORDER = ("output", "template", "other")
TOP_PER_ROLE = 5  # features per role on the run page's card
MAX_GRAPHS_FOR_TRIGGER = 200  # graphs looked at for a study site's prompt


class Member(BaseModel):
    layer: int
    index: int
    role: str | None
    score: float | None
    top_token: str | None = None
    label: str | None = None
    frequency: float | None = None


class Condition(BaseModel):
    """One model condition of the study's report prompts."""

    name: str
    n: int | None = None
    hesitation_rate: float | None = None
    hesitation_tokens: int | None = None
    accuracy: float | None = None
    mean_length: float | None = None


class FamilyRow(BaseModel):
    family: str
    adapted: Condition
    ablated: Condition


class StudyFinding(BaseModel):
    """What the hesitation study found, as the paper states it."""

    set_id: int
    name: str
    size: int
    n_features: int | None
    fraction: float | None
    roles: dict[str, int]
    removal: float | None = Field(description="Share of the adapted model's hesitation tokens removed (report prompts).")
    conditions: list[Condition] = Field(description="target, adapted, ablated, control (when run).")
    control_size: int | None = None
    control_removal: float | None = None
    families: list[FamilyRow]
    growth: list[dict[str, Any]] = Field(description="Set sizes tried on the validation prompts, with removal.")
    reached_target: bool | None = None
    n_graphs: int | None = None
    words: list[str] = []
    description: str | None = None


class StudyCard(BaseModel):
    finding: StudyFinding | None
    top: dict[str, list[Member]] = Field(description="The strongest members per role (output, template, other).")
    trigger: dict[str, Any] | None = Field(None, description="A trigger prompt (token ids) for 'ablate the set'.")


class SetPage(BaseModel):
    run: RunRef
    id: int
    name: str
    description: str | None
    finding: StudyFinding | None
    members: list[Member]
    trigger: dict[str, Any] | None = None


def _condition(name: str, raw: Any) -> Condition:
    raw = raw if isinstance(raw, dict) else {}
    return Condition(name=name, n=raw.get("n"), hesitation_rate=as_float(raw.get("hesitation_rate")),
                     hesitation_tokens=raw.get("hesitation_tokens"), accuracy=as_float(raw.get("accuracy")),
                     mean_length=as_float(raw.get("mean_length")))


def study_finding(fs: FeatureSet) -> StudyFinding | None:
    """The study's figures kept with the set (None for a set without a study summary)."""
    s = fs.summary if isinstance(fs.summary, dict) else None
    if not s or not isinstance(s.get("report"), dict):
        return None
    report, sset, choice = s["report"], s.get("set") or {}, s.get("choice") or {}
    conditions = [_condition(n, report.get(n)) for n in ("target", "adapted", "ablated") if n in report]
    control = report.get("control") if isinstance(report.get("control"), dict) else None
    if control:
        conditions.append(_condition("control", control))
    adapted_groups = (report.get("adapted") or {}).get("by_group") or {}
    ablated_groups = (report.get("ablated") or {}).get("by_group") or {}
    families = [FamilyRow(family=g, adapted=_condition("adapted", adapted_groups[g]),
                          ablated=_condition("ablated", ablated_groups.get(g)))
                for g in sorted(adapted_groups) if g]
    return StudyFinding(
        set_id=fs.id, name=fs.name, size=int(sset.get("size") or 0), n_features=sset.get("n_features"),
        fraction=as_float(sset.get("fraction")), roles={k: int(v) for k, v in (sset.get("roles") or {}).items()},
        removal=as_float(report.get("removal")), conditions=conditions,
        control_size=control.get("size") if control else None,
        control_removal=as_float(control.get("removal")) if control else None, families=families,
        growth=[h for h in choice.get("history") or [] if isinstance(h, dict)],
        reached_target=choice.get("reached_target"), n_graphs=(s.get("sites") or {}).get("n_graphs"),
        words=list(s.get("words") or []), description=fs.description,
    )


def _role(role: str | None) -> str:
    return role if role in ROLE_ORDER else "other"


def members(session: Session, run: Any, set_id: int, per_role: int | None = None) -> list[Member]:
    """A set's members, strongest first, with their top logit-lens token, label and frequency.

    ``per_role``: only the strongest that many of each role (the run page's card). They are chosen from the
    members' scores before any feature row is read, so the card reads 15 features' logit lenses, not the
    whole set's (thousands at the paper's scale; benchmarks/web.py: 73 → 15 ms of server CPU per run page at 538 members).
    The choice itself is a window function in the database: reading and sorting 5,500 members in Python was still
    ~85% of the run page at the paper's scale (39 ms). The features' columns come from an outer join in the same
    query (a member whose feature was not collected gets None), not a second query listing the members' keys: that
    statement differed with every set and was rebuilt per request (``study_card`` 2.2–2.4 → 1.4 ms of CPU on Postgres).
    """
    m, f = FeatureSetMember, Feature
    info = (f.label, f.logit_lens, f.frequency)  # from the same query: one round trip, one cached statement
    if per_role is None:
        found = session.execute(select(m.layer, m.index, m.role, m.score, *info)
                                .outerjoin(f, and_(f.run_id == run.id, f.layer == m.layer, f.index == m.index))
                                .where(m.set_id == set_id)).all()
    else:
        role = case((m.role.in_(ROLE_ORDER), m.role), else_=literal("other"))
        rank = func.row_number().over(partition_by=role, order_by=(func.coalesce(m.score, 0.0).desc(), m.layer,
                                                                    m.index))
        ranked = select(m.layer, m.index, m.role, m.score, rank.label("rank")).where(m.set_id == set_id).subquery()
        found = session.execute(
            select(ranked.c.layer, ranked.c.index, ranked.c.role, ranked.c.score, *info)
            .outerjoin(f, and_(f.run_id == run.id, f.layer == ranked.c.layer, f.index == ranked.c.index))
            .where(ranked.c.rank <= per_role)).all()
    rows = sorted(found, key=lambda r: (-(r.score or 0.0), r.layer, r.index))
    vocab = run_vocab(session, run)
    return [Member(layer=r.layer, index=r.index, role=r.role, score=r.score, label=r.label, frequency=r.frequency,
                   top_token=top_token(r.logit_lens, vocab)) for r in rows]


def trigger_prompt(session: Session, run_id: int) -> dict[str, Any] | None:
    """A prompt on which the target hesitated: the problem of one of the study's graphs (preferring "Wait"),
    as token ids up to where the model starts answering, for "ablate the set" (never re-tokenized)."""
    rows = session.execute(select(Graph.id, Graph.slug, Graph.params).where(Graph.run_id == run_id)
                           .order_by(Graph.id).limit(MAX_GRAPHS_FOR_TRIGGER)).all()
    best = None
    for g in rows:
        params = g.params if isinstance(g.params, dict) else {}
        study, ids = params.get("study") or {}, params.get("prompt_token_ids")
        if not isinstance(ids, list) or not isinstance(study.get("prompt_len"), int):
            continue
        cand = {"graph_id": g.id, "slug": g.slug, "word": study.get("word"), "group": study.get("group"),
                "token_ids": [int(t) for t in ids[: study["prompt_len"]]]}
        if best is None or (cand["word"] == "Wait" and best["word"] != "Wait"):
            best = cand
    return best


def study_card(session: Session, run: Any) -> StudyCard | None:
    """The run page's study card: the hesitation set's finding and its strongest members by role."""
    hset = hesitation_set(session, run.id)
    if hset is None:
        return None
    top: dict[str, list[Member]] = {}
    for m in members(session, run, hset.id, per_role=TOP_PER_ROLE):
        top.setdefault(_role(m.role), []).append(m)
    return StudyCard(finding=study_finding(hset), top={r: top[r] for r in ROLE_ORDER if r in top},
                     trigger=trigger_prompt(session, run.id))


def set_page(session: Session, run_key: str | int, set_id: int) -> SetPage:
    run = get_run(session, run_key)
    fs = session.get(FeatureSet, set_id)
    if fs is None or fs.run_id != run.id:
        raise NotFound(f"No feature set {set_id} in run {run.id}.")
    return SetPage(run=run_ref(run), id=fs.id, name=fs.name, description=fs.description, finding=study_finding(fs),
                   members=members(session, run, fs.id), trigger=trigger_prompt(session, run.id))
