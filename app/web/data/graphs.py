"""An attribution graph's page and its circuit-tracer JSON download.

Stored nodes and links are already in circuit-tracer's node format (node_id, feature, layer, ctx_idx,
feature_type, jsNodeId, clerp, influence, activation; links {source, target, weight}); the download
wraps them in the ``metadata`` and ``qParams`` the viewer and Neuronpedia require (formats.md).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureSetMember, Graph, Prompt
from app.web.data.common import (
    NotFound,
    RunRef,
    as_float,
    get_run,
    hesitation_set,
    hesitation_words,
    keys_condition,
    run_ref,
    run_vocab,
)
from app.web.data.feature import Tok, _lens, _node_index, token_views, top_token

NON_FEATURE_TYPES = ("embedding", "logit", "mlp reconstruction error")
SCHEMA_VERSION = 1  # circuit-tracer's graph JSON schema_version (2026 releases)


class GraphNode(BaseModel):
    node_id: str
    kind: str = Field(description="feature | embedding | logit | error")
    layer: str
    ctx_idx: int
    feature: int | None = None
    fl: tuple[int, int] | None = Field(None, description="(layer, index) of a feature node.")
    clerp: str | None = None
    influence: float | None = None
    activation: float | None = None
    role: str | None = None
    top_token: str | None = None
    top_tokens: list[str] = Field([], description="The feature's top logit-lens tokens (up to 5).")
    label: str | None = None


class GraphLink(BaseModel):
    source: str
    target: str
    weight: float


class GraphFeature(BaseModel):
    layer: int
    index: int
    role: str | None
    score: float | None = None
    label: str | None = None
    top_token: str | None = None
    positions: list[int] = []


class GraphPage(BaseModel):
    run: RunRef
    id: int
    slug: str
    prompt: str
    prompt_id: int | None
    prompt_tokens: list[Tok]
    position: int | None = Field(description="The position whose next token the graph explains.")
    target_token_id: int | None = None
    target_token: str | None
    params: dict[str, Any]
    scores: dict[str, Any]
    nodes: list[GraphNode]
    links: list[GraphLink]
    output_features: list[GraphFeature]
    template_features: list[GraphFeature]
    other_features: list[GraphFeature]
    max_abs_weight: float


def _graph(session: Session, run_id: int, graph_id: int) -> Graph:
    g = session.get(Graph, graph_id)
    if g is None or g.run_id != run_id:
        raise NotFound(f"No graph {graph_id} in run {run_id}.")
    return g


def _kind(node: dict[str, Any]) -> str:
    ft = node.get("feature_type")
    if ft == "embedding":
        return "embedding"
    if ft == "logit":
        return "logit"
    if ft == "mlp reconstruction error":
        return "error"
    return "feature"


def _prompt_tokens(session: Session, g: Graph, run: Any) -> list[Tok]:
    vocab, words = run_vocab(session, run), hesitation_words(run)
    if g.prompt_id is not None:
        p = session.get(Prompt, g.prompt_id)
        if p is not None and p.token_ids:
            return token_views(vocab, list(p.token_ids), None, words)
    ids = (g.params or {}).get("prompt_token_ids")
    if isinstance(ids, list) and ids:
        return token_views(vocab, ids, None, words)
    texts = (g.params or {}).get("prompt_tokens")
    if isinstance(texts, list):
        return [Tok(id=-1, text=str(t)) for t in texts]
    return []


def graph_page(session: Session, run_key: str | int, graph_id: int) -> GraphPage:
    run = get_run(session, run_key)
    g = _graph(session, run.id, graph_id)
    raw_nodes = [n for n in (g.nodes or []) if isinstance(n, dict) and "node_id" in n]
    keys = set()
    for n in raw_nodes:
        if _kind(n) == "feature":
            idx = _node_index(n)
            if idx is not None and str(n.get("layer", "")).isdigit():
                keys.add((int(n["layer"]), idx))
    info: dict[tuple[int, int], Any] = {}
    roles: dict[tuple[int, int], tuple[str | None, float | None]] = {}
    key_list = sorted(keys)
    hset = hesitation_set(session, run.id)
    for chunk in (key_list[i:i + 500] for i in range(0, len(key_list), 500)):
        for r in session.execute(
            select(Feature.layer, Feature.index, Feature.label, Feature.logit_lens)
            .where(Feature.run_id == run.id, keys_condition(Feature.layer, Feature.index, chunk))
        ):
            info[(r.layer, r.index)] = r
        if hset is not None:
            for m in session.execute(
                select(FeatureSetMember.layer, FeatureSetMember.index, FeatureSetMember.role, FeatureSetMember.score)
                .where(FeatureSetMember.set_id == hset.id,
                       keys_condition(FeatureSetMember.layer, FeatureSetMember.index, chunk))
            ):
                roles[(m.layer, m.index)] = (m.role, m.score)

    vocab = run_vocab(session, run)
    nodes, features = [], {}
    for n in raw_nodes:
        kind = _kind(n)
        fl = None
        if kind == "feature":
            idx = _node_index(n)
            fl = (int(n["layer"]), idx) if idx is not None and str(n.get("layer", "")).isdigit() else None
        r = info.get(fl) if fl else None
        role = n.get("role") or (roles.get(fl, (None, None))[0] if fl else None)
        node = GraphNode(
            node_id=str(n["node_id"]), kind=kind, layer=str(n.get("layer", "")), ctx_idx=int(n.get("ctx_idx", 0) or 0),
            feature=n.get("feature") if isinstance(n.get("feature"), int) else None, fl=fl,
            clerp=n.get("clerp") or None, influence=as_float(n.get("influence")),
            activation=as_float(n.get("activation")), role=role,
            top_token=top_token(r.logit_lens, vocab) if r else None, label=r.label if r else None,
            top_tokens=[t.text for t in _lens((r.logit_lens or {}).get("top"), vocab)[:5]]
            if r and isinstance(r.logit_lens, dict) else [],
        )
        nodes.append(node)
        if fl:
            f = features.setdefault(fl, GraphFeature(layer=fl[0], index=fl[1], role=role,
                                                     score=roles.get(fl, (None, None))[1], label=node.label,
                                                     top_token=node.top_token))
            f.positions.append(node.ctx_idx)
    node_ids = {n.node_id for n in nodes}
    links = [
        GraphLink(source=str(e["source"]), target=str(e["target"]), weight=float(e["weight"]))
        for e in (g.links or [])
        if isinstance(e, dict) and e.get("source") in node_ids and e.get("target") in node_ids
        and as_float(e.get("weight")) is not None
    ]
    by_role: dict[str, list[GraphFeature]] = {"output": [], "template": [], "other": []}
    for f in sorted(features.values(), key=lambda f: (f.layer, f.index)):
        by_role[f.role if f.role in ("output", "template") else "other"].append(f)
    return GraphPage(
        run=run_ref(run), id=g.id, slug=g.slug, prompt=g.prompt, prompt_id=g.prompt_id,
        prompt_tokens=_prompt_tokens(session, g, run),
        position=g.position, target_token_id=g.target_token_id, target_token=g.target_token_str, params=g.params or {}, scores=g.scores or {},
        nodes=nodes, links=links, output_features=by_role["output"], template_features=by_role["template"],
        other_features=by_role["other"], max_abs_weight=max((abs(e.weight) for e in links), default=0.0),
    )


def _exact_texts(session: Session, run: Any, toks: list[Tok]) -> list[str]:
    """Each prompt token's exact decoded text (exports carry the model's text, not the page's display form)."""
    vocab = run_vocab(session, run)
    out = []
    for t in toks:
        tt = vocab.token(t.id) if t.id >= 0 and vocab.tokenizer is not None else None
        out.append(tt.exact if tt is not None and tt.kind != "padding" else t.text)
    return out


def circuit_tracer_json(session: Session, run_key: str | int, graph_id: int) -> dict[str, Any]:
    """The graph as circuit-tracer / Neuronpedia graph JSON (metadata, qParams, nodes, links)."""
    run = get_run(session, run_key)
    g = _graph(session, run.id, graph_id)
    params = g.params or {}
    toks = _prompt_tokens(session, g, run)
    node_threshold = as_float(params.get("node_threshold"))
    edge_threshold = as_float(params.get("edge_threshold"))
    metadata: dict[str, Any] = {
        "slug": g.slug,
        "scan": str(params.get("scan") or f"adapterlens-run-{run.id}"),
        "transcoder_list": list(params.get("transcoder_list") or []),
        "prompt_tokens": _exact_texts(session, run, toks),
        "prompt": g.prompt,
        "node_threshold": node_threshold,
        "schema_version": SCHEMA_VERSION,
        "info": {
            "description": f"AdapterLens run {run.name}: {run.base_model} → {run.target_model}",
            "generator": {"name": "adapterlens", "version": "0.1.0", "url": ""},
            "create_time_ms": int(g.created.timestamp() * 1000) if g.created else None,
        },
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
    }
    if g.target_token_str is not None:
        metadata["adapterlens"] = {"run_id": run.id, "graph_id": g.id, "target_token": g.target_token_str,
                                   "position": g.position}
    return {
        "metadata": metadata,
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": list(g.nodes or []),
        "links": list(g.links or []),
    }
