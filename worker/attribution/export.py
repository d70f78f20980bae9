"""circuit-tracer's graph JSON (its viewer and Neuronpedia read it): export and import.

Our own pydantic models of the public format (fields from circuit-tracer's ``frontend/graph_models.py``
and Neuronpedia's ``graph-schema.json``): top level ``metadata``, ``qParams``, ``nodes``, ``links``.
Node ids: feature ``{layer}_{index}_{pos}``, error ``{layer}_-1_{pos}`` (older files: ``0_{layer}_{pos}``
is not distinguishable and is read by ``feature_type``), token ``E_{vocab}_{pos}``, logit
``{L+1}_{vocab}_{pos}``. A feature's ``feature`` field is the cantor pairing of (layer, index): that
pairing exists only inside this JSON; everywhere else a feature id is (layer, index). Our own extras
live under new optional keys (``metadata.adapterlens``, node ``raw_influence``), which both readers ignore.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from app.db.text import storable
from worker.attribution.graph import GraphNode, PrunedGraph

FEATURE_TYPE = "cross layer transcoder"  # what circuit-tracer writes for any transcoder feature
ERROR_TYPE = "mlp reconstruction error"
SCHEMA_VERSION = 1


class Tokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class GeneratorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    version: str | None = None
    url: str | None = None


class Info(BaseModel):
    model_config = ConfigDict(extra="allow")
    description: str | None = None
    creator_name: str | None = None
    creator_url: str | None = None
    source_urls: list[str] | None = None
    generator: GeneratorInfo | None = None
    create_time_ms: float | None = None


class PruningSettings(BaseModel):
    model_config = ConfigDict(extra="allow")
    node_threshold: float | None = None
    edge_threshold: float | None = None


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    slug: str
    scan: str
    transcoder_list: list[str] = Field(default_factory=list)
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = SCHEMA_VERSION
    info: Info | None = None
    generation_settings: dict[str, Any] | None = None
    pruning_settings: PruningSettings | None = None
    feature_details: dict[str, Any] | None = None


class QParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    pinnedIds: list[str] = Field(default_factory=list)
    supernodes: list[list[str]] = Field(default_factory=list)
    linkType: str = "both"
    clickedId: str = ""
    sg_pos: str = ""


class Node(BaseModel):
    model_config = ConfigDict(extra="allow")
    node_id: str
    feature: int | None
    layer: str
    ctx_idx: int
    feature_type: str
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0


class Link(BaseModel):
    source: str
    target: str
    weight: float


class GraphFile(BaseModel):
    """The whole file; ``model_dump(exclude_none=True)`` gives the JSON object."""

    model_config = ConfigDict(extra="allow")
    metadata: Metadata
    qParams: QParams = Field(default_factory=QParams)
    nodes: list[Node]
    links: list[Link]


def cantor_pair(layer: int, index: int) -> int:
    return (layer + index) * (layer + index + 1) // 2 + index


def cantor_unpair(z: int) -> tuple[int, int]:
    w = int(((8 * z + 1) ** 0.5 - 1) // 2)
    while w * (w + 1) // 2 > z:  # guard the float square root at large z
        w -= 1
    while (w + 1) * (w + 2) // 2 <= z:
        w += 1
    index = z - w * (w + 1) // 2
    return w - index, index


def node_id(node: GraphNode, n_layers: int) -> str:
    if node.kind == "feature":
        return f"{node.layer}_{node.index}_{node.pos}"
    if node.kind == "error":
        return f"{node.layer}_-1_{node.pos}"
    if node.kind == "token":
        return f"E_{node.index}_{node.pos}"
    return f"{n_layers + 1}_{node.index}_{node.pos}"


def _decode(tokenizer: Tokenizer | None, token_id: int) -> str:
    return storable(tokenizer.decode([token_id])) if tokenizer is not None else f"<{token_id}>"


def _node_json(node: GraphNode, n_layers: int, tokenizer: Tokenizer | None, clerp: str) -> Node:
    nid = node_id(node, n_layers)
    extra = {"raw_influence": node.influence} if node.influence is not None else {}
    common = {"node_id": nid, "ctx_idx": node.pos, "influence": node.cumulative_influence, **extra}
    if node.kind == "feature":
        return Node(feature=cantor_pair(node.layer, node.index), layer=str(node.layer), feature_type=FEATURE_TYPE,
                    jsNodeId=f"{node.layer}_{node.index}-0", clerp=clerp, activation=node.activation, **common)
    if node.kind == "error":
        return Node(feature=-1, layer=str(node.layer), feature_type=ERROR_TYPE,
                    jsNodeId=f"{node.layer}_-1-{node.pos}", clerp=clerp, **common)
    if node.kind == "token":
        return Node(feature=node.pos, layer="E", feature_type="embedding", jsNodeId=f"E_{node.index}-{node.pos}",
                    clerp=clerp, **common)
    label = f'Output "{_decode(tokenizer, node.index)}" (p={node.token_prob:.3f})'
    return Node(feature=node.index, layer=str(n_layers + 1), feature_type="logit",
                jsNodeId=f"L_{node.index}-{node.pos}", clerp=clerp or label, token_prob=node.token_prob,
                is_target_logit=node.is_target_logit, **common)


def to_circuit_tracer_json(pruned: PrunedGraph, tokenizer: Tokenizer | None, *, slug: str, scan: str,
                           prompt: str | None = None, clerps: Mapping[tuple[int, int], str] | None = None,
                           feature_json_base_url: str | None = None, description: str | None = None) -> dict:
    """The graph as circuit-tracer's JSON object (``json.dumps`` it to write the file).

    ``scan``: the feature set's id (the viewer looks features up by it); ``clerps``: labels per feature id
    (layer, index); ``tokenizer``: decodes prompt tokens and logit labels (ids as ``<id>`` without one).
    """
    if not slug or not scan:
        raise ValueError(f"slug and scan must be non-empty, got slug={slug!r}, scan={scan!r}")
    clerps = clerps or {}
    tokens = [_decode(tokenizer, t) for t in pruned.input_ids]
    nodes = [_node_json(n, pruned.n_layers, tokenizer,
                        clerps.get((n.layer, n.index), "") if n.kind == "feature" else "") for n in pruned.nodes]
    ids = [n.node_id for n in nodes]
    links = [Link(source=ids[s], target=ids[t], weight=w) for s, t, w in pruned.links]
    gen = {k: pruned.settings[k] for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
           if k in pruned.settings}
    meta = Metadata(
        slug=slug, scan=scan, prompt_tokens=tokens, prompt=prompt if prompt is not None else "".join(tokens),
        node_threshold=pruned.node_threshold,
        info=Info(description=description, generator=GeneratorInfo(name="adapterlens", version="0.1.0"),
                  create_time_ms=time.time() * 1000),
        generation_settings=gen or None,
        pruning_settings=PruningSettings(node_threshold=pruned.node_threshold, edge_threshold=pruned.edge_threshold),
        feature_details={"feature_json_base_url": feature_json_base_url} if feature_json_base_url else None,
        adapterlens={"mode": pruned.mode, "n_layers": pruned.n_layers, "input_ids": list(pruned.input_ids),
                     "logit_position": pruned.logit_position, "settings": pruned.settings},
    )
    return GraphFile(metadata=meta, nodes=nodes, links=links).model_dump(exclude_none=True)


def _parse_id(nid: str, n: int) -> list[str]:
    parts = nid.split("_")
    if len(parts) != n:
        raise ValueError(f"malformed node_id {nid!r}")
    return parts


def from_circuit_tracer_json(data: Mapping[str, Any]) -> PrunedGraph:
    """Read a circuit-tracer / Neuronpedia graph JSON object (ours or theirs) into a :class:`PrunedGraph`.

    Node order becomes features, errors, tokens, logits (the file's order within each kind); unknown
    keys are ignored.
    """
    f = GraphFile.model_validate(data)
    ours = (f.metadata.model_extra or {}).get("adapterlens") or {}
    parsed: list[tuple[str, GraphNode]] = []
    logit_layers = set()
    for n in f.nodes:
        extra = n.model_extra or {}
        raw = extra.get("raw_influence")
        common = {"influence": raw, "cumulative_influence": n.influence}
        if n.feature_type == "embedding":
            _, vocab, pos = _parse_id(n.node_id, 3)
            node = GraphNode("token", int(pos), int(vocab), **common)
        elif n.feature_type == "logit":
            layer, vocab, pos = _parse_id(n.node_id, 3)
            logit_layers.add(int(layer))
            node = GraphNode("logit", int(pos), int(vocab), token_prob=n.token_prob,
                             is_target_logit=n.is_target_logit, **common)
        elif n.feature_type == ERROR_TYPE:
            node = GraphNode("error", n.ctx_idx, -1, int(n.layer), activation=n.activation, **common)
        else:
            layer, index, pos = _parse_id(n.node_id, 3)
            node = GraphNode("feature", int(pos), int(index), int(layer), activation=n.activation, **common)
        parsed.append((n.node_id, node))
    rank = {"feature": 0, "error": 1, "token": 2, "logit": 3}
    parsed.sort(key=lambda p: rank[p[1].kind])  # stable: the file's order within each kind
    where = {nid: i for i, (nid, _) in enumerate(parsed)}
    links = []
    for link in f.links:
        if link.source not in where or link.target not in where:
            raise ValueError(f"link {link.source} -> {link.target} names a node that is not in the file")
        links.append((where[link.source], where[link.target], link.weight))
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
