"""A pruned graph as circuit-tracer's graph JSON (its viewer and Neuronpedia read it), and back.

The models and the id forms live in :mod:`app.formats` (torch-free, shared with the web app's export and
import). A feature's ``feature`` field is the cantor pairing of (layer, index): that pairing exists only
inside this JSON; everywhere else a feature id is (layer, index). Our own extras live under new optional
keys (``metadata.adapterlens``, node ``raw_influence``), which both readers ignore.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from app.db.text import storable
from app.formats import (
    EMBEDDING_TYPE,
    ERROR_TYPE,
    FEATURE_TYPE,
    GENERATOR,
    LOGIT_TYPE,
    GraphFile,
    GraphLink,
    GraphMetadata,
    GraphNode,
    Info,
    PruningSettings,
    cantor_pair,
    error_js_id,
    error_node_id,
    feature_node_id,
    logit_node_id,
    non_feature_nodes,
    normalize_graph,
    parse_node,
    token_node_id,
)
from worker.attribution.graph import GraphNode as Node
from worker.attribution.graph import PrunedGraph


class Tokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def node_id(node: Node, n_layers: int) -> str:
    if node.kind == "feature":
        return feature_node_id(node.layer, node.index, node.pos)
    if node.kind == "error":
        return error_node_id(node.layer, node.pos)
    if node.kind == "token":
        return token_node_id(node.index, node.pos)
    return logit_node_id(n_layers, node.index, node.pos)


def _decode(tokenizer: Tokenizer | None, token_id: int) -> str:
    return storable(tokenizer.decode([token_id])) if tokenizer is not None else f"<{token_id}>"


def _node_json(node: Node, n_layers: int, tokenizer: Tokenizer | None, clerp: str) -> GraphNode:
    nid = node_id(node, n_layers)
    extra = {"raw_influence": node.influence} if node.influence is not None else {}
    common = {"node_id": nid, "ctx_idx": node.pos, "influence": node.cumulative_influence, **extra}
    if node.kind == "feature":
        return GraphNode(feature=cantor_pair(node.layer, node.index), layer=str(node.layer), feature_type=FEATURE_TYPE,
                         jsNodeId=f"{node.layer}_{node.index}-0", clerp=clerp, activation=node.activation, **common)
    if node.kind == "error":
        return GraphNode(feature=-1, layer=str(node.layer), feature_type=ERROR_TYPE,
                         jsNodeId=error_js_id(node.layer, node.pos), clerp=clerp, **common)
    if node.kind == "token":
        return GraphNode(feature=node.pos, layer="E", feature_type=EMBEDDING_TYPE,
                         jsNodeId=f"E_{node.index}-{node.pos}", clerp=clerp, **common)
    label = f'Output "{_decode(tokenizer, node.index)}" (p={node.token_prob:.3f})'
    return GraphNode(node_id=nid, ctx_idx=node.pos, feature=node.index, layer=str(n_layers + 1),
                     feature_type=LOGIT_TYPE, jsNodeId=f"L_{node.index}-{node.pos}", clerp=clerp or label,
                     token_prob=node.token_prob, is_target_logit=node.is_target_logit)  # no influence, as circuit-tracer


def to_circuit_tracer_json(pruned: PrunedGraph, tokenizer: Tokenizer | None, *, slug: str, scan: str,
                           prompt: str | None = None, clerps: Mapping[tuple[int, int], str] | None = None,
                           feature_json_base_url: str | None = None, description: str | None = None,
                           extra: Mapping[str, Any] | None = None) -> dict:
    """The graph as circuit-tracer's JSON object (``json.dumps`` it to write the file).

    ``scan``: the feature set's id (the viewer looks features up by it); ``clerps``: labels per feature id
    (layer, index); ``tokenizer``: decodes prompt tokens and logit labels (ids as ``<id>`` without one);
    ``extra``: more keys for ``metadata.adapterlens`` (e.g. the graph's scores).
    """
    if not slug or not scan:
        raise ValueError(f"slug and scan must be non-empty, got slug={slug!r}, scan={scan!r}")
    clerps = clerps or {}
    tokens = [_decode(tokenizer, t) for t in pruned.input_ids]
    nodes = [_node_json(n, pruned.n_layers, tokenizer,
                        clerps.get((n.layer, n.index), "") if n.kind == "feature" else "") for n in pruned.nodes]
    ids = [n.node_id for n in nodes]
    links = [GraphLink(source=ids[s], target=ids[t], weight=w) for s, t, w in pruned.links]
    gen = {k: pruned.settings[k] for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
           if k in pruned.settings}
    meta = GraphMetadata(
        slug=slug, scan=scan, transcoder_list=[], prompt_tokens=tokens,
        prompt=prompt if prompt is not None else "".join(tokens), node_threshold=pruned.node_threshold,
        info=Info(description=description, generator=GENERATOR, create_time_ms=time.time() * 1000),
        generation_settings=gen or None,
        pruning_settings=PruningSettings(node_threshold=pruned.node_threshold, edge_threshold=pruned.edge_threshold),
        feature_details={"feature_json_base_url": feature_json_base_url} if feature_json_base_url else None,
        adapterlens={"mode": pruned.mode, "n_layers": pruned.n_layers, "input_ids": list(pruned.input_ids),
                     "logit_position": pruned.logit_position, "settings": pruned.settings,
                     "non_feature_nodes": non_feature_nodes(pruned.mode), **(extra or {})},
    )
    return GraphFile(metadata=meta, nodes=nodes, links=links).dump()


def from_circuit_tracer_json(data: Mapping[str, Any]) -> PrunedGraph:
    """Read a circuit-tracer / Neuronpedia graph JSON object (ours or theirs) into a :class:`PrunedGraph`.

    Either error-id form is read (:func:`app.formats.normalize_graph`). Node order becomes features,
    errors, tokens, logits (the file's order within each kind); unknown keys are ignored.
    """
    f = normalize_graph(dict(data))
    ours = (f.metadata.model_extra or {}).get("adapterlens") or {}
    parsed: list[tuple[str, Node]] = []
    logit_layers = set()
    for n in f.nodes:
        raw = (n.model_extra or {}).get("raw_influence")
        common = {"influence": raw, "cumulative_influence": n.influence}
        kind, layer, index, pos = parse_node(n)
        if kind == "embedding":
            node = Node("token", pos, index, **common)
        elif kind == "logit":
            logit_layers.add(int(n.layer))
            node = Node("logit", pos, index, token_prob=n.token_prob, is_target_logit=n.is_target_logit, **common)
        elif kind == "error":
            node = Node("error", pos, -1, layer, activation=n.activation, **common)
        else:
            node = Node("feature", pos, index, layer, activation=n.activation, **common)
        parsed.append((n.node_id, node))
    rank = {"feature": 0, "error": 1, "token": 2, "logit": 3}
    parsed.sort(key=lambda p: rank[p[1].kind])  # stable: the file's order within each kind
    where = {nid: i for i, (nid, _) in enumerate(parsed)}
    links = [(where[link.source], where[link.target], link.weight) for link in f.links]
    nodes = [n for _, n in parsed]
    if "n_layers" in ours:
        n_layers = int(ours["n_layers"])
    elif logit_layers:
        n_layers = max(logit_layers) - 1
    else:
        n_layers = 1 + max((n.layer for n in nodes if n.layer is not None), default=-1)
    tokens = sorted((n for n in nodes if n.kind == "token"), key=lambda n: n.pos)
    input_ids = ours.get("input_ids") or [n.index for n in tokens]
    prune = f.metadata.pruning_settings
    logits = [n.pos for n in nodes if n.kind == "logit"]
    return PrunedGraph(
        nodes=nodes, links=links, input_ids=[int(i) for i in input_ids], n_layers=n_layers, mode=ours.get("mode"),
        node_threshold=prune.node_threshold if prune else f.metadata.node_threshold,
        edge_threshold=prune.edge_threshold if prune else None,
        logit_position=ours.get("logit_position", logits[0] if logits else None),
        settings=dict(ours.get("settings") or f.metadata.generation_settings or {}),
    )
