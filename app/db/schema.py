"""The one schema module: every table AdapterLens stores, as SQLAlchemy 2 declarative models.

Migrations are generated from these models and a test checks that ``alembic upgrade head`` yields
exactly this schema on SQLite and Postgres, so change a model only together with a new revision.

Conventions that hold for every table:
- A feature is identified by ``(run_id, layer, index)`` everywhere; ``features`` uses that triple
  as its primary key, so a feature page is a primary-key lookup.
- Token ids are stored; token strings are decoded for display only, never re-tokenized.
- JSON columns are ``JSON`` on SQLite and ``JSONB`` on Postgres; Python ``None`` is SQL NULL.
  They are not mutation-tracked: assign a new value instead of editing one in place.
- Timestamps are timezone-aware UTC on both backends (``UTCDateTime``).
- Child rows hang off ``runs`` with ``ON DELETE CASCADE``, so deleting a run removes its data.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can drop what they created on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (what every timestamp column stores)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is aware UTC on the way in and out.

    Postgres keeps the zone (``timestamptz``); SQLite stores naive text, so values are converted
    to UTC before writing and tagged UTC after reading. Naive inputs are taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    """Declarative base; its metadata carries the naming convention."""


def _run_fk() -> Any:
    return ForeignKey("runs.id", ondelete="CASCADE")


def _created() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, server_default=text("CURRENT_TIMESTAMP"))


# --------------------------------------------------------------------------------------------- runs


class Run(Base):
    """One adapter training run on a (base, target) model pair; everything else hangs off it.

    ``status`` is free text set by the pipeline (e.g. created, training, trained, collecting, ready,
    failed). ``config`` is the config actually used; ``evaluation`` the evaluate job's numbers.
    """

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    base_model: Mapped[str] = mapped_column(String(500))
    target_model: Mapped[str] = mapped_column(String(500))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(32), default="created", server_default="created")
    created: Mapped[datetime] = _created()
    updated: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, onupdate=utcnow, server_default=text("CURRENT_TIMESTAMP")
    )
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    n_layers: Mapped[int | None] = mapped_column(Integer)
    n_features: Mapped[int | None] = mapped_column(Integer)
    d_model: Mapped[int | None] = mapped_column(Integer)
    checkpoint: Mapped[str | None] = mapped_column(String(1000), doc="Path of the adapter checkpoint.")

    def has_feature(self, layer: int, index: int) -> bool:
        """Whether (layer, index) names one of the run's features (a size not yet known admits any)."""
        return (0 <= layer and 0 <= index and (self.n_layers is None or layer < self.n_layers)
                and (self.n_features is None or index < self.n_features))


class RunMetric(Base):
    """One logged training step (loss terms, L0, learning rate …); re-logging a step replaces it."""

    __tablename__ = "run_metrics"

    run_id: Mapped[int] = mapped_column(_run_fk(), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)


# ----------------------------------------------------------------------------------------- features


class Feature(Base):
    """Per-feature statistics gathered by the collect job.

    ``histogram``: ``{"edges": [...log-spaced...], "counts": [...]}``.
    ``logit_lens``: ``{"top": [[token_id, token_str, value], ...], "bottom": [...]}``.
    ``region_counts``: ``{region: count}``; ``think_pos_hist``: ``{"edges": [...], "counts": [...]}``.
    ``neighbours``: ``[[layer, index, cosine], ...]`` by decoder cosine.
    ``hesitation_lens``: the largest demeaned logit-lens value among the run's hesitation tokens (worker/collect/lens.py).
    """

    __tablename__ = "features"

    run_id: Mapped[int] = mapped_column(_run_fk(), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    frequency: Mapped[float] = mapped_column(Float, default=0.0)
    max_act: Mapped[float] = mapped_column(Float, default=0.0)
    mean_act: Mapped[float] = mapped_column(Float, default=0.0)
    histogram: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    logit_lens: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    region_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    think_pos_hist: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    label: Mapped[str | None] = mapped_column(String(500))
    category: Mapped[str | None] = mapped_column(String(100))
    neighbours: Mapped[list[Any] | None] = mapped_column(JSONType)
    hesitation_lens: Mapped[float | None] = mapped_column(
        Float, doc="Its largest logit-lens value among the hesitation tokens (how directly it promotes 'Wait').")

    # The sort indexes end in (layer, index), the tie-break of the feature index's keyset pagination,
    # so every page is one index range scan (migration 0002).
    __table_args__ = (
        Index("ix_features_run_layer_freq", "run_id", "layer", "frequency", "index"),
        Index("ix_features_run_category", "run_id", "category"),
        Index("ix_features_run_max_act", "run_id", "max_act", "layer", "index"),
        Index("ix_features_run_frequency", "run_id", "frequency", "layer", "index"),
        Index("ix_features_run_hesitation_lens", "run_id", "hesitation_lens", "layer", "index"),  # migration 0005
    )


class FeatureToken(Base):
    """The token → feature table behind token search: which features *promote* a token (it is in their
    logit-lens top 10) and which *fire on* it (it is the focus token of one of their top examples).

    Filled by the collect job beside ``features`` (one row per feature, relation and token id). ``value`` is
    the strength that orders search results: the logit-lens value for ``promotes``, the largest activation
    on that token among the top examples for ``fires_on``; ``rank`` is the token's place in the lens (0 =
    top) or the best example rank.
    """

    __tablename__ = "feature_tokens"

    run_id: Mapped[int] = mapped_column(_run_fk(), primary_key=True)
    relation: Mapped[str] = mapped_column(String(16), primary_key=True, doc='"promotes" | "fires_on"')
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)


class FeatureLabel(Base):
    """A feature's label and category from one labeler (``source``: ``builtin`` or an LLM's model name).

    ``category`` is the paper's level 1 (language, domain, reasoning, uninterpretable); ``subcategory`` its
    level 2 (reasoning: output, input_simple, input_abstract; domain: math, science, code) or the built-in
    rules' finer kind. ``score``: the LLM's detection-scoring accuracy, or the built-in rules' consistency
    (the share of the evidence the label covers). ``details`` holds what the labeler saw or measured.
    The labeler written last also fills ``features.label`` / ``features.category`` (what the index shows).

    Full-text search of ``label``: Postgres has a GIN index on ``to_tsvector('simple', label)`` (below);
    SQLite an FTS5 table ``feature_labels_fts`` (external content, kept by triggers) that migration 0007 makes
    outside these models; :data:`SEARCH_SHADOW_TABLES` names its tables.
    """

    __tablename__ = "feature_labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk())
    layer: Mapped[int] = mapped_column(Integer)
    index: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(200), doc='"builtin" or the labelling model\'s name')
    label: Mapped[str] = mapped_column(String(500))
    category: Mapped[str | None] = mapped_column(String(100))
    subcategory: Mapped[str | None] = mapped_column(String(100))
    score: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created: Mapped[datetime] = _created()

    __table_args__ = (
        Index("ix_feature_labels_feature", "run_id", "layer", "index", "source", unique=True),
        Index("ix_feature_labels_run_source", "run_id", "source", "layer", "category", "subcategory"),
        Index("ix_feature_labels_fts", text("to_tsvector('simple', label)"), postgresql_using="gin"
              ).ddl_if(dialect="postgresql"),
    )


LABEL_FTS_TABLE = "feature_labels_fts"
SEARCH_SHADOW_TABLES = frozenset({LABEL_FTS_TABLE} | {f"{LABEL_FTS_TABLE}_{s}" for s in
                                                       ("data", "idx", "content", "docsize", "config")})
"""Tables of the SQLite label search index (an FTS5 table and its shadow tables), made by migration 0007 and not
by these models; schema comparisons leave them out (migrations/env.py, tests/db/test_migrations.py)."""


def include_name(name: str | None, type_: str, parent_names: Any = None) -> bool:
    """Alembic's ``include_name`` hook: every object but the label search index's own tables."""
    return not (type_ == "table" and name in SEARCH_SHADOW_TABLES)


class Example(Base):
    """One context window shown for a feature: top-k, a quantile bin's sample, or a random firing.

    ``acts`` holds one activation per token of ``token_ids``; ``focus`` is the position the example
    was selected for. ``rank`` orders examples within (feature, kind); for quantile examples the
    collector encodes the bin in it.
    """

    __tablename__ = "examples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk())
    layer: Mapped[int] = mapped_column(Integer)
    index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16), doc='"top" | "random" | "quantile"')
    rank: Mapped[int] = mapped_column(Integer)
    token_ids: Mapped[list[Any]] = mapped_column(JSONType)
    acts: Mapped[list[Any]] = mapped_column(JSONType)
    focus: Mapped[int] = mapped_column(Integer)
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("prompts.id", ondelete="SET NULL"))
    prompt_pos: Mapped[int | None] = mapped_column(Integer, doc="the focus token's position in prompt_id's ids")
    max_act: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_examples_feature", "run_id", "layer", "index", "kind", "rank", unique=True),)


COLLECTION_SOURCE = "collection"  # Prompt.source of the corpus sequences collect stores (examples point at them)


class Prompt(Base):
    """A prompt or full trace with its token ids and chat regions (``[[start, end, region], ...]``)."""

    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk(), index=True)
    source: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[Any]] = mapped_column(JSONType)
    regions: Mapped[list[Any] | None] = mapped_column(JSONType)
    answer: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


# ------------------------------------------------------------------------------------------- graphs


class Graph(Base):
    """An attribution graph for one prompt and target token (nodes, links, scores as JSON)."""

    __tablename__ = "graphs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk())
    slug: Mapped[str] = mapped_column(String(200))
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("prompts.id", ondelete="SET NULL"))
    prompt: Mapped[str] = mapped_column(Text)
    target_token_id: Mapped[int | None] = mapped_column(Integer)
    target_token_str: Mapped[str | None] = mapped_column(String(200))
    position: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    nodes: Mapped[list[Any]] = mapped_column(JSONType)
    links: Mapped[list[Any]] = mapped_column(JSONType)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created: Mapped[datetime] = _created()

    __table_args__ = (UniqueConstraint("run_id", "slug"),)


class GraphFeature(Base):
    """Which features a stored graph holds (one row per graph and feature): the feature page's "In attribution
    graphs" is an index lookup here instead of a scan of every graph's node JSON. Written with the graph."""

    __tablename__ = "graph_features"

    graph_id: Mapped[int] = mapped_column(ForeignKey("graphs.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk())
    positions: Mapped[list[Any]] = mapped_column(JSONType, doc="Token positions of the feature's nodes.")
    influence: Mapped[float | None] = mapped_column(Float, doc="Its best (smallest) cumulative influence rank share.")
    activation: Mapped[float | None] = mapped_column(Float, doc="Its largest activation among the nodes.")

    __table_args__ = (Index("ix_graph_features_feature", "run_id", "layer", "index"),)


class FeatureSet(Base):
    """A named group of features (e.g. the hesitation circuit), members carry a role and score.

    ``summary`` holds what produced the set, e.g. the hesitation study's figures (its job result: removal,
    accuracy, random control, per-family figures, how the set grew), so pages can show the finding.
    """

    __tablename__ = "feature_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk())
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created: Mapped[datetime] = _created()

    __table_args__ = (UniqueConstraint("run_id", "name"),)


class FeatureSetMember(Base):
    __tablename__ = "feature_set_members"

    set_id: Mapped[int] = mapped_column(ForeignKey("feature_sets.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str | None] = mapped_column(String(32), doc='"output" | "template" | ...')
    score: Mapped[float | None] = mapped_column(Float)


# -------------------------------------------------------------------------------- interactive results


class Ablation(Base):
    """An interactive ablation request; its generated tokens stream into ``ablation_tokens``."""

    __tablename__ = "ablations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk(), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(32), default="todo", server_default="todo")
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created: Mapped[datetime] = _created()
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)


class AblationToken(Base):
    """One generated token under one condition ("unablated" | "ablated" | "target" | "hybrid")."""

    __tablename__ = "ablation_tokens"

    ablation_id: Mapped[int] = mapped_column(ForeignKey("ablations.id", ondelete="CASCADE"), primary_key=True)
    condition: Mapped[str] = mapped_column(String(16), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer)
    token_str: Mapped[str] = mapped_column(String(200))
    logprob: Mapped[float | None] = mapped_column(Float)
    kl: Mapped[float | None] = mapped_column(Float)


class Experiment(Base):
    """A batch experiment (e.g. ablate a feature set over many prompts) with per-prompt rows."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk(), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(32), default="todo", server_default="todo")
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created: Mapped[datetime] = _created()
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)


class ExperimentRow(Base):
    """One prompt under one condition; ``meta`` holds anything condition-specific (e.g. token ids)."""

    __tablename__ = "experiment_rows"

    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    prompt_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    condition: Mapped[str] = mapped_column(String(32), primary_key=True)
    response_len: Mapped[int | None] = mapped_column(Integer)
    hesitations: Mapped[int | None] = mapped_column(Integer)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    answer: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class LensResult(Base):
    """A diff lens of one text (target, hybrid, adapted on the same ids; ``lens`` job, migration 0005).

    ``request``: what was asked (free text and chat flag, or explicit ids; watched features). ``token_key``:
    a hash of the token ids the worker ran (``app.db.lens_request.token_key``), so a second request for the
    same run and ids reuses the result. ``result``: per position KL(target‖hybrid), KL(target‖adapted), top
    tokens of each model and the active features with activation and direct effect; the per-text feature
    table. ``summary``: the small numbers a list shows (tokens, mean KLs, seconds).
    """

    __tablename__ = "lens_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(_run_fk())
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(32), default="todo", server_default="todo")
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    request_key: Mapped[str] = mapped_column(String(64), doc="Hash of the request (text or ids, chat, watched).")
    token_key: Mapped[str | None] = mapped_column(String(64), doc="Hash of the token ids the lens ran on.")
    n_tokens: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created: Mapped[datetime] = _created()
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_lens_results_run_request", "run_id", "request_key"),
        Index("ix_lens_results_run_tokens", "run_id", "token_key"),
    )


# --------------------------------------------------------------------------------------- job queue


class JobStatus(enum.StrEnum):
    TODO = "todo"  # waiting to be claimed (maybe for run_after or depends_on)
    RUNNING = "running"  # claimed by locked_by until locked_until; lapsed lease = claimable again
    SUCCEEDED = "succeeded"  # handler returned; result holds its return value
    FAILED = "failed"  # out of attempts, unknown kind, bad payload, or its dependency failed
    CANCELLED = "cancelled"  # cancelled by a user; a running handler sees it via is_cancelled()


class Job(Base):
    """A unit of work for the worker: a kind, a payload validated by that kind's model, a lease."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[JobStatus] = mapped_column(
        Enum(
            JobStatus,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=JobStatus.TODO,
        server_default=JobStatus.TODO.value,
    )
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0", doc="Higher runs first.")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    locked_by: Mapped[str | None] = mapped_column(String(128))
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType, doc="{done, total, message}")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text, doc="Traceback of the last failed attempt.")
    depends_on: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    created: Mapped[datetime] = _created()
    started: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_jobs_claim", "status", "priority", "id"),)


class Worker(Base):
    """A live (or recently dead) worker process; ``heartbeat_at`` says which.

    A worker that ``adapterlens up`` supervises keeps its id across restarts: ``restarts`` counts them,
    ``stopped`` is set while its process is down, and ``note`` says why (the supervisor writes both).
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started: Mapped[datetime] = _created()
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kinds: Mapped[str | None] = mapped_column(String(300))  # what it claims: "ablate, lens", "all but …"; None: all
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    stopped: Mapped[datetime | None] = mapped_column(UTCDateTime)
    note: Mapped[str | None] = mapped_column(String(500))
