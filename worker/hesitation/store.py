"""Writing graphs and feature sets: idempotent by their natural keys, as every handler writes.

- a graph row is keyed by (run_id, slug): a re-run with the same slug replaces it (:func:`write_graph`);
  the study removes its own graphs that a re-run no longer produces (:func:`delete_graphs_except`);
- a feature set is keyed by (run_id, name); its members are replaced whole (:func:`write_feature_set`).

Nodes and links are stored in circuit-tracer's node format, exactly as
:func:`worker.attribution.to_circuit_tracer_json` writes them (its ``nodes``/``links``); the rest of that
JSON's metadata goes into ``params`` so the file can be rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.graphs import index_graph_features
from app.db.schema import Feature, FeatureSet, FeatureSetMember
from app.db.schema import Graph as GraphRow
from app.db.text import storable
from app.db.write import replace_rows, upsert
from worker.attribution import Graph, PrunedGraph, to_circuit_tracer_json
from worker.attribution.graph import compute_node_influence

FeatureKey = tuple[int, int]
TOKEN_STR_MAX = 200  # characters: the width of graphs.target_token_str
CLERP_MAX = 60  # characters of a feature's label used as its clerp


def clerps_for(session: Session, run_id: int, keys: Iterable[FeatureKey]) -> dict[FeatureKey, str]:
    """A short label per feature from the collected ``features`` rows: its label, else its top logit-lens token.

    Features without a row (collection not run) get none; the viewer then shows the node id.
    """
    wanted = set(keys)
    if not wanted:
        return {}
    layers = sorted({layer for layer, _ in wanted})
    rows = session.execute(select(Feature.layer, Feature.index, Feature.label, Feature.logit_lens)
                           .where(Feature.run_id == run_id, Feature.layer.in_(layers)))
    out = {}
    for layer, index, label, lens in rows:
        if (layer, index) not in wanted:
            continue
        if label:
            out[(layer, index)] = label[:CLERP_MAX]
            continue
        top = (lens or {}).get("top") or []
        if top and len(top[0]) >= 2 and top[0][1] is not None:
            out[(layer, index)] = f"↑{top[0][1]!r}"
    return out


def graph_scores(graph: Graph, pruned: PrunedGraph, target_token: int | None) -> dict[str, Any]:
    """Summary numbers of a graph: sizes, the target's probability, and what pruning and the node budget kept.

    ``kept_feature_influence``: share of the feature nodes' influence on the logits (circuit-tracer's
    weighting by probability) that the pruned graph keeps; ``dropped_share``: for the target logit, the
    |contribution| of active features that are no nodes relative to all its feature and token edges.
    """
    n_feat = graph.n_feature_nodes
    infl = compute_node_influence(graph.adjacency_matrix.double(), graph.logit_weights().double())[:n_feat]
    kept = {(n.layer, n.pos, n.index) for n in pruned.nodes if n.kind == "feature"}
    mask = torch.tensor([tuple(f) in kept for f in graph.feature_nodes.tolist()], dtype=torch.bool)
    total = float(infl.sum())
    scores: dict[str, Any] = {
        "n_active_features": int(graph.active_features.shape[0]), "n_feature_nodes": n_feat,
        "n_nodes": len(pruned.nodes), "n_links": len(pruned.links),
        "n_pruned_features": sum(1 for n in pruned.nodes if n.kind == "feature"),
        "kept_feature_influence": float(infl[mask].sum()) / total if total > 0 else None,
    }
    if target_token is not None:
        try:
            row = graph.logit_node_index(int(target_token))
        except KeyError:
            return scores
        k = row - n_feat - graph.n_pos
        scores["target_prob"] = float(graph.logit_probabilities[k])
        edges = float(graph.adjacency_matrix[row].abs().sum())
        dropped = abs(float(graph.dropped_contributions[row]))
        scores["dropped_share"] = dropped / (edges + dropped) if edges + dropped > 0 else 0.0
    return scores


def graph_row(run_id: int, slug: str, graph: Graph, pruned: PrunedGraph, tokenizer: Any, *, prompt: str,
              prompt_id: int | None = None, clerps: Mapping[FeatureKey, str] | None = None,
              scan: str | None = None, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``graphs`` row of one attribution graph (nodes and links in circuit-tracer's format)."""
    target = graph.target_token if graph.target_token is not None else (
        int(graph.logit_tokens[0]) if graph.n_logits else None)
    data = to_circuit_tracer_json(pruned, tokenizer, slug=slug, scan=scan or f"adapterlens-run-{run_id}",
                                  prompt=storable(prompt), clerps=clerps)
    meta = data["metadata"]
    return {
        "run_id": run_id, "slug": slug, "prompt_id": prompt_id, "prompt": storable(prompt),
        "target_token_id": target,
        "target_token_str": storable(tokenizer.decode([target]))[:TOKEN_STR_MAX] if target is not None else None,
        "position": graph.n_pos - 1,
        "params": {
            "mode": graph.mode, "node_threshold": pruned.node_threshold, "edge_threshold": pruned.edge_threshold,
            **{k: graph.settings.get(k) for k in ("max_feature_nodes", "max_n_logits", "desired_logit_prob",
                                                   "batch_size")},
            "scan": meta["scan"], "transcoder_list": meta.get("transcoder_list", []),
            "prompt_token_ids": graph.input_ids.tolist(), "prompt_tokens": meta["prompt_tokens"],
            "metadata": meta, **(params or {}),
        },
        "nodes": data["nodes"], "links": data["links"],
        "scores": graph_scores(graph, pruned, target),
    }


def write_graph(session: Session, row: Mapping[str, Any]) -> int:
    """Insert or replace the graph (run_id, slug) and its ``graph_features`` index; returns its id."""
    (graph_id,) = upsert(session, GraphRow, dict(row), key=["run_id", "slug"])
    index_graph_features(session, int(graph_id), int(row["run_id"]), row.get("nodes") or [])
    return int(graph_id)


def delete_graphs_except(session: Session, run_id: int, prefix: str, keep: Sequence[str]) -> int:
    """Delete the run's graphs whose slug starts with ``prefix`` and is not in ``keep``; returns how many."""
    stale = [s for s in session.scalars(select(GraphRow.slug).where(GraphRow.run_id == run_id,
                                                                    GraphRow.slug.startswith(prefix)))
             if s not in set(keep)]
    if stale:
        session.execute(delete(GraphRow).where(GraphRow.run_id == run_id, GraphRow.slug.in_(stale)))
    return len(stale)


def write_feature_set(session: Session, run_id: int, name: str, description: str,
                      members: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None = None) -> int:
    """Insert or update the set (run_id, name) with what produced it, and replace its members
    ({layer, index, role, score})."""
    (set_id,) = upsert(session, FeatureSet, {"run_id": run_id, "name": name, "description": description,
                                             "summary": dict(summary) if summary is not None else None},
                       key=["run_id", "name"])
    rows = [{"layer": int(m["layer"]), "index": int(m["index"]), "role": m.get("role"), "score": m.get("score")}
            for m in members]
    replace_rows(session, FeatureSetMember, {"set_id": int(set_id)}, rows)
    return int(set_id)
