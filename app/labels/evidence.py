"""What a labeler may see of a feature: its own stored examples, logit lens and firing statistics.

Read a slice of features at a time (``SLICE`` per query, one layer), so labelling 229k features holds one
slice in memory. Nothing else of the run is read (not the hesitation study's roles, not other features).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Text, null, select, type_coerce
from sqlalchemy.orm import Session

try:  # optional: decodes the examples' JSON several times faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

from app.db.schema import Example, Feature

SLICE = 512  # features read per query
TOP_EXAMPLES = 10  # top examples a labeler reads (the paper's judge sees up to 10)
RANDOM_EXAMPLES = 10  # random examples (reservoir over the nonzero activations)


@dataclass(frozen=True)
class ExampleEvidence:
    kind: str  # "top" | "random"
    rank: int
    token_ids: list[int]
    acts: list[float]  # one per token (empty when read without activations)
    focus: int
    max_act: float


@dataclass
class FeatureEvidence:
    layer: int
    index: int
    frequency: float
    max_act: float
    logit_top: list[tuple[int, float]]  # (token id, lens value), strongest first
    region_counts: dict[str, float]
    think_pos: list[float]  # active thinking tokens per tenth of the thinking span
    examples: list[ExampleEvidence] = field(default_factory=list)

    @property
    def top(self) -> list[ExampleEvidence]:
        return [e for e in self.examples if e.kind == "top"]

    @property
    def random(self) -> list[ExampleEvidence]:
        return [e for e in self.examples if e.kind == "random"]


def _lens(raw: Any) -> list[tuple[int, float]]:
    out = []
    for entry in (raw or {}).get("top", []) if isinstance(raw, dict) else []:
        if isinstance(entry, list | tuple) and len(entry) >= 3 and isinstance(entry[0], int) \
                and isinstance(entry[2], int | float):
            out.append((entry[0], float(entry[2])))
    return out


def _numbers(raw: Any) -> list[float]:
    counts = raw.get("counts") if isinstance(raw, dict) else None
    return [float(c) for c in counts if isinstance(c, int | float)] if isinstance(counts, list) else []


def _json(value: Any) -> Any:
    """A JSON column read as text (SQLite) decoded here, once; a driver-decoded value (Postgres jsonb) as is."""
    if isinstance(value, str | bytes):
        return _orjson.loads(value) if _orjson is not None else json.loads(value)
    return value


def feature_keys(session: Session, run_id: int, layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(layer, index) of every collected feature of the run (of ``layers``), in order."""
    stmt = select(Feature.layer, Feature.index).where(Feature.run_id == run_id)
    if layers is not None:
        stmt = stmt.where(Feature.layer.in_(list(layers)))
    return [(r.layer, r.index) for r in session.execute(stmt.order_by(Feature.layer, Feature.index))]


def slices(keys: Sequence[tuple[int, int]], size: int = SLICE) -> Iterator[list[tuple[int, int]]]:
    """Consecutive runs of ``keys`` in one layer, at most ``size`` long (one query each)."""
    batch: list[tuple[int, int]] = []
    for key in keys:
        if batch and (len(batch) >= size or key[0] != batch[0][0]):
            yield batch
            batch = []
        batch.append(key)
    if batch:
        yield batch


def load_evidence(session: Session, run_id: int, keys: Sequence[tuple[int, int]], *,
                  n_top: int = TOP_EXAMPLES, n_random: int = RANDOM_EXAMPLES,
                  with_acts: bool = True) -> list[FeatureEvidence]:
    """The evidence of ``keys`` (one layer, as :func:`slices` yields them), in the order given.

    Without ``with_acts`` the per-token activations are not read (the built-in rules need only the focus);
    ``acts`` is then empty.
    """
    if not keys:
        return []
    layer = keys[0][0]
    if any(k[0] != layer for k in keys):
        raise ValueError("load_evidence reads one layer at a time")
    lo, hi = min(k[1] for k in keys), max(k[1] for k in keys)
    wanted = {k[1] for k in keys}
    feats: dict[int, FeatureEvidence] = {}
    for r in session.execute(
        select(Feature.index, Feature.frequency, Feature.max_act, Feature.logit_lens, Feature.region_counts,
               Feature.think_pos_hist)
        .where(Feature.run_id == run_id, Feature.layer == layer, Feature.index >= lo, Feature.index <= hi)
    ):
        if r.index in wanted:
            regions = {str(k): float(v) for k, v in (r.region_counts or {}).items() if isinstance(v, int | float)}
            feats[r.index] = FeatureEvidence(layer, r.index, float(r.frequency or 0.0), float(r.max_act or 0.0),
                                             _lens(r.logit_lens), regions, _numbers(r.think_pos_hist))
    acts_col = type_coerce(Example.acts, Text).label("acts") if with_acts else null().label("acts")
    for e in session.execute(
        select(Example.index, Example.kind, Example.rank, type_coerce(Example.token_ids, Text).label("token_ids"),
               acts_col, Example.focus, Example.max_act)
        .where(Example.run_id == run_id, Example.layer == layer, Example.index >= lo, Example.index <= hi,
               Example.kind.in_(("top", "random")), Example.rank < max(n_top, n_random))
        .order_by(Example.index, Example.kind, Example.rank)
    ):
        f = feats.get(e.index)
        if f is None or e.rank >= (n_top if e.kind == "top" else n_random):
            continue
        ids = _json(e.token_ids) or []  # the collector's lists of ints and floats, used as read
        acts = (_json(e.acts) or []) if with_acts else []
        if not isinstance(ids, list) or not isinstance(acts, list):
            continue
        focus = e.focus if 0 <= e.focus < len(ids) else 0
        if ids:
            f.examples.append(ExampleEvidence(e.kind, e.rank, ids, acts, focus, float(e.max_act or 0.0)))
    return [feats[k[1]] for k in keys if k[1] in feats]
