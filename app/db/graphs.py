"""Which features a stored graph holds: the ``graph_features`` rows written beside every ``graphs`` row.

A graph's nodes are circuit-tracer node dicts (``node_id`` ``{layer}_{index}_{pos}`` for features); this
reads the feature nodes once when the graph is written, so that a feature page lists its graphs with an
index lookup instead of a scan of every graph's JSON. Torch-free: the worker's graph writer and a graph
import both call :func:`index_graph_features`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from app.db.schema import GraphFeature
from app.db.write import replace_rows

NON_FEATURE_TYPES = ("embedding", "logit", "mlp reconstruction error", "mlp error", "error")


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def feature_key(node: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(layer, index)`` of a feature node (our ``index`` key, else the middle of its ``node_id``), else None."""
    if not isinstance(node, Mapping) or node.get("feature_type") in NON_FEATURE_TYPES:
        return None
    layer = str(node.get("layer", ""))
    if not layer.isdigit():
        return None
    index = node.get("index")
    if not isinstance(index, int):
        parts = str(node.get("node_id", "")).split("_")
        if len(parts) != 3 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            return None
        index = int(parts[1])
    return int(layer), int(index)


def graph_feature_rows(run_id: int, nodes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per feature of the graph: its positions, best influence and largest activation."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for node in nodes:
        key = feature_key(node)
        if key is None:
            continue
        row = rows.setdefault(key, {"run_id": run_id, "layer": key[0], "index": key[1], "positions": [],
                                    "influence": None, "activation": None})
        pos = node.get("ctx_idx")
        if isinstance(pos, int) and pos not in row["positions"]:
            row["positions"].append(pos)
        influence, act = _number(node.get("influence")), _number(node.get("activation"))
        if influence is not None:
            row["influence"] = influence if row["influence"] is None else min(row["influence"], influence)
        if act is not None:
            row["activation"] = act if row["activation"] is None else max(row["activation"], act)
    for row in rows.values():
        row["positions"].sort()
    return list(rows.values())


def index_graph_features(session: Session, graph_id: int, run_id: int, nodes: Iterable[Mapping[str, Any]]) -> int:
    """Replace the ``graph_features`` rows of a graph from its nodes (in the caller's transaction)."""
    return replace_rows(session, GraphFeature, {"graph_id": graph_id}, graph_feature_rows(run_id, nodes))
