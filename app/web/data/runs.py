"""The run overview: evaluation table, training curves and links to everything the run has."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.schema import (
    Ablation,
    Experiment,
    Feature,
    FeatureSet,
    FeatureSetMember,
    Graph,
    GraphFeature,
    Job,
    Run,
    RunMetric,
)
from app.db.skipscan import distinct_in_run
from app.labels.analysis import CategoryAnalysis, category_analysis
from app.web.data.common import RunRef, as_float, get_run, run_ref
from app.web.data.sets import StudyCard, study_card

MODEL_ORDER = ("base", "hybrid", "adapted", "target")
COUNT_CAP = 10_000  # features counted row by row on the overview; larger runs count their collected layers
MAX_CURVE_POINTS = 2000  # per series; longer runs are thinned evenly so a page stays light
NOT_CURVES = {"step", "epoch", "tokens"}  # bookkeeping counters: as a curve against step they say nothing


class ModelRow(BaseModel):
    name: str
    kl_to_target: float | None = None  # held-out texts
    nmse_mean: float | None = None  # held-out texts
    hesitation_rate: float | None = None
    mean_response_len: float | None = None
    accuracy: float | None = None


class Evaluation(BaseModel):
    models: list[ModelRow]
    kl_gap_closed: float | None = None
    reproduced_hesitation: float | None = None
    false_hesitation: float | None = None
    same_output: float | None = None
    l0_mean: float | None = None
    l0_per_layer: list[float] = []
    dead_features_per_layer: list[int] = []
    n_prompts: int | None = None
    texts_from: str | None = None  # where the held-out texts of KL, NMSE and L0 come from
    n_texts: int | None = None
    n_tokens: int | None = None
    prompts_from: str | None = None  # where the prompts of the generation columns come from


class Curves(BaseModel):
    """Training metrics by step: one series per scalar key; list-valued keys become ``key[i]``."""

    steps: list[int]
    series: dict[str, list[float | None]]


class LinkItem(BaseModel):
    id: int
    title: str
    detail: str | None = None
    status: str | None = None
    created: datetime | None = None


class Promoter(BaseModel):
    """A feature that promotes the hesitation tokens through the logit lens (``features.hesitation_lens``)."""

    layer: int
    index: int
    hesitation_lens: float
    label: str | None = None


class RunPage(BaseModel):
    run: RunRef
    runs: list[RunRef]
    config: dict[str, Any]
    n_layers: int | None
    n_features: int | None
    d_model: int | None
    checkpoint: str | None
    evaluation: Evaluation | None
    curves: Curves | None
    n_collected: int
    graphs: list[LinkItem]
    feature_sets: list[LinkItem]
    ablations: list[LinkItem]
    experiments: list[LinkItem]
    jobs: list[LinkItem]
    study: StudyCard | None = Field(None, description="The hesitation study's finding and its top features.")
    categories: CategoryAnalysis | None = Field(None, description="Feature categories per layer and overall, by one "
                                                "labeler (the paper's analysis); None before any labelling.")
    promotes_hesitation: list[Promoter] = Field([], description="The features whose logit lens most promotes a "
                                                "hesitation token ('Wait' …), strongest first.")


class IndexPage(BaseModel):
    """What ``/`` knows: the latest run (the HTML page redirects to it) or nothing yet."""

    latest: RunRef | None
    runs: list[RunRef]


def list_runs(session: Session, limit: int = 50) -> list[RunRef]:
    return [run_ref(r) for r in session.scalars(select(Run).order_by(Run.id.desc()).limit(limit))]


def index_page(session: Session) -> IndexPage:
    runs = list_runs(session)
    return IndexPage(latest=runs[0] if runs else None, runs=runs)


def _evaluation(raw: dict[str, Any] | None) -> Evaluation | None:
    if not raw or not isinstance(raw, dict):
        return None
    models = raw.get("models") or {}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    names = [n for n in MODEL_ORDER if n in models] + sorted(n for n in models if n not in MODEL_ORDER)
    rows = []
    for name in names:
        m = models.get(name) or {}
        nmse = [x for x in (m.get("nmse_per_layer") or []) if isinstance(x, int | float)]
        rows.append(ModelRow(
            name=name, kl_to_target=as_float(m.get("kl_to_target")),
            nmse_mean=sum(nmse) / len(nmse) if nmse else None,
            hesitation_rate=as_float(m.get("hesitation_rate")),
            mean_response_len=as_float(m.get("mean_response_len")), accuracy=as_float(m.get("accuracy")),
        ))
    return Evaluation(
        models=rows, kl_gap_closed=as_float(raw.get("kl_gap_closed")),
        reproduced_hesitation=as_float(raw.get("reproduced_hesitation")),
        false_hesitation=as_float(raw.get("false_hesitation")), same_output=as_float(raw.get("same_output")),
        l0_mean=as_float(raw.get("l0_mean")),
        l0_per_layer=[float(x) for x in raw.get("l0_per_layer") or [] if isinstance(x, int | float)],
        dead_features_per_layer=[int(x) for x in raw.get("dead_features_per_layer") or [] if isinstance(x, int | float)],
        n_prompts=raw.get("n_prompts") if isinstance(raw.get("n_prompts"), int) else None,
        texts_from=_text(data.get("texts")), prompts_from=_text(data.get("prompts")),
        n_texts=raw.get("n_texts") if isinstance(raw.get("n_texts"), int) else None,
        n_tokens=raw.get("n_tokens") if isinstance(raw.get("n_tokens"), int) else None,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _curves(session: Session, run_id: int) -> Curves | None:
    rows = session.execute(
        select(RunMetric.step, RunMetric.metrics).where(RunMetric.run_id == run_id).order_by(RunMetric.step)
    ).all()
    if not rows:
        return None
    if len(rows) > MAX_CURVE_POINTS:
        stride = -(-len(rows) // MAX_CURVE_POINTS)
        rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    flat: list[dict[str, float]] = []
    for _, metrics in rows:
        point: dict[str, float] = {}
        for key, value in (metrics or {}).items():
            if isinstance(value, bool) or key in NOT_CURVES:
                continue
            if isinstance(value, int | float):
                point[key] = float(value)
            elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                point.update({f"{key}[{i}]": float(v) for i, v in enumerate(value)})
        flat.append(point)
    keys = sorted({k for p in flat for k in p})
    return Curves(steps=[s for s, _ in rows], series={k: [p.get(k) for p in flat] for k in keys})


def _n_collected(session: Session, run: Run) -> int:
    """Features collected: counted row by row for a small run; for a large one, the layers present times the
    features per layer (a layer is written whole, dead features included: worker/collect/store), found by a loose
    index scan. Counting even 10,000 index entries per view cost Postgres ~6 ms of CPU, most of the run page's."""
    width = run.n_features if run.n_layers and run.n_features else None
    if width is not None and run.n_layers * width > COUNT_CAP:
        return len(distinct_in_run(session, "features", "layer", run.id, run.n_layers)) * width
    capped = select(Feature.index).where(Feature.run_id == run.id).limit(COUNT_CAP + 1).subquery()
    return min(session.scalar(select(func.count()).select_from(capped)) or 0, COUNT_CAP)


def run_page(session: Session, run_key: str | int, labels: str | None = None) -> RunPage:
    run = get_run(session, run_key)
    rid = run.id
    n_collected = _n_collected(session, run)
    graph_rows = session.execute(
        select(Graph.id, Graph.slug, Graph.target_token_str, Graph.created)
        .where(Graph.run_id == rid).order_by(Graph.id.desc()).limit(50)
    ).all()
    n_kept = dict(session.execute(  # features each listed graph kept (pruning may keep none: the page says so)
        select(GraphFeature.graph_id, func.count()).where(GraphFeature.graph_id.in_([g.id for g in graph_rows]))
        .group_by(GraphFeature.graph_id)).all()) if graph_rows else {}
    graphs = [
        LinkItem(id=g.id, title=g.slug, created=g.created,
                 detail=" · ".join(filter(None, [g.target_token_str and f"→ {g.target_token_str!r}",
                                                 _kept(n_kept.get(g.id, 0))])))
        for g in graph_rows
    ]
    members = (select(FeatureSetMember.set_id, func.count().label("n")).group_by(FeatureSetMember.set_id).subquery())
    sets = [
        LinkItem(id=s.id, title=s.name, detail=f"{s.n or 0} features", created=s.created)
        for s in session.execute(
            select(FeatureSet.id, FeatureSet.name, FeatureSet.created, members.c.n)
            .outerjoin(members, members.c.set_id == FeatureSet.id)
            .where(FeatureSet.run_id == rid).order_by(FeatureSet.id)
        )
    ]
    ablations = [ablation_item(a) for a in session.scalars(
        select(Ablation).where(Ablation.run_id == rid).order_by(Ablation.id.desc()).limit(20))]
    experiments = experiment_items(session, rid, limit=20)
    jobs = [_job_item(j) for j in session.scalars(select(Job).where(Job.run_id == rid).order_by(Job.id.desc()).limit(20))]
    return RunPage(
        run=run_ref(run), runs=list_runs(session), config=run.config or {}, n_layers=run.n_layers,
        n_features=run.n_features, d_model=run.d_model, checkpoint=run.checkpoint,
        evaluation=_evaluation(run.evaluation), curves=_curves(session, rid), n_collected=n_collected,
        graphs=graphs, feature_sets=sets, ablations=ablations, experiments=experiments, jobs=jobs,
        study=study_card(session, run), categories=category_analysis(session, rid, labels),
        promotes_hesitation=promoters(session, rid),
    )


PROMOTERS_SHOWN = 10  # features listed on the run page as promoting hesitation


def promoters(session: Session, run_id: int, limit: int = PROMOTERS_SHOWN) -> list[Promoter]:
    """The features that fire and have the largest hesitation lens (a range scan of ix_features_run_hesitation_lens;
    dead features promote nothing in practice, so they are left out here, not in the feature index)."""
    rows = session.execute(
        select(Feature.layer, Feature.index, Feature.hesitation_lens, Feature.label)
        .where(Feature.run_id == run_id, Feature.hesitation_lens.is_not(None), Feature.frequency > 0)
        .order_by(Feature.hesitation_lens.desc(), Feature.layer.desc(), Feature.index.desc()).limit(limit))
    return [Promoter(layer=r.layer, index=r.index, hesitation_lens=r.hesitation_lens, label=r.label) for r in rows]


def _job_item(j: Job) -> LinkItem:
    from app.web.data.jobs import job_view
    from app.web.templating import duration

    v = job_view(j)
    when = f"{duration(v.elapsed_s)}" if v.elapsed_s is not None else None
    bits = [b for b in (f"{v.percent:.0f}%" if v.percent is not None and v.status == "running" else None, when,
                        (j.progress or {}).get("message") if v.status == "running" else None) if b]
    return LinkItem(id=j.id, title=j.kind, status=v.status, detail=" · ".join(bits) or None, created=j.created)


def experiment_items(session: Session, run_id: int, limit: int = 200) -> list[LinkItem]:
    """A run's experiments, newest first."""
    return [
        LinkItem(id=e.id, title=e.name, status=e.status, created=e.created,
                 detail=_experiment_detail(e.summary))
        for e in session.scalars(select(Experiment).where(Experiment.run_id == run_id)
                                 .order_by(Experiment.id.desc()).limit(limit))
    ]


def _kept(n: int) -> str:
    return f"{n} feature{'s' if n != 1 else ''}" if n else "pruning kept no feature"


def _experiment_detail(summary: dict[str, Any] | None) -> str | None:
    cond = (summary or {}).get("conditions") if isinstance(summary, dict) else None
    if not isinstance(cond, dict) or "unablated" not in cond:
        return None
    parts = []
    for name, c in cond.items():
        if isinstance(c, dict) and isinstance(c.get("hesitation_rate"), int | float):
            parts.append(f"{name}: {100 * c['hesitation_rate']:.0f}% hesitate")
    return f"{summary.get('n_prompts', '?')} prompts · " + ", ".join(parts) if parts else None


def ablation_item(a: Ablation) -> LinkItem:
    from app.web.data.ablations import request_view

    req = request_view(a.request)
    n = len(req.features)
    detail = f"{n} feature{'s' if n != 1 else ''}, {req.mode}: {req.prompt[:60]}"
    return LinkItem(id=a.id, title=f"Ablation {a.id}", detail=detail, status=a.status, created=a.created)
