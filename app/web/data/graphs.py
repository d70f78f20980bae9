"""An attribution graph's page, its compact view data, and its circuit-tracer JSON download.

Stored nodes and links are in circuit-tracer's node format (node_id, feature, layer, ctx_idx, feature_type,
jsNodeId, clerp, influence, activation; links {source, target, weight}). Three readers:

- :func:`graph_header`: what the page shows before any node is loaded (prompt, target, mode, scores, counts);
  it reads no node or link column, so a 1 GB graph's page still opens at once and says how big it is;
- :func:`graph_view`: what the viewer draws, pruned on the server (``pruning_threshold``: nodes whose
  cumulative influence is above it are not sent; ``max_nodes``: at most that many feature and error nodes,
  the most influential; ``keep``: ids sent whatever the cut, e.g. pinned ones) and columnar (one list per
  field, links by node index), with a mini feature card per feature (label, top and bottom logit tokens
  without padded-vocabulary ids, frequency for the density filter);
- :func:`circuit_tracer_json`: the file circuit-tracer's viewer and Neuronpedia open (the stored metadata
  when the row has it, so an imported file exports as it came in).
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureSetMember, Graph, Prompt
from app.formats import (
    SCHEMA_VERSION,
    GraphFile,
    GraphFormatError,
    cantor_unpair,
    node_kind,
    non_feature_nodes,
)
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
from app.web.data.feature import Tok, token_views
from app.web.tokens import Vocab

KIND_CODE = {"feature": 0, "error": 1, "embedding": 2, "logit": 3}
MAX_VIEW_NODES = 20_000  # feature + error nodes the viewer loads without being asked for more
LARGE_GRAPH_BYTES = 50 * 2**20  # bytes: above this the page asks before loading the whole graph
CARD_TOKENS = 6  # top / bottom logit tokens on a node's mini feature card
ROLE_LIST_MAX = 100  # "other" features listed on the page (the viewer has them all)
MAX_CARDS = 200  # feature cards per request
BYTES_PER_NODE, BYTES_PER_LINK = 260, 70  # rough JSON sizes, for the count shown before loading


class GraphFeature(BaseModel):
    layer: int
    index: int
    role: str | None
    score: float | None = None
    label: str | None = None
    top_token: str | None = None
    positions: list[int] = []


class LogitChoice(BaseModel):
    node_id: str
    token_id: int
    text: str
    prob: float


class AblateTarget(BaseModel):
    """What "ablate pinned" submits besides the features: the graph's own token ids (its stored prompt, else the
    ids kept with the graph) up to the explained position, never re-tokenized text, and its target token."""

    source: str = Field(description="prompt_id | token_ids (the ablation request's prompt source)")
    prompt_id: int | None = None
    token_ids: list[int] | None = None
    prompt_tokens: int
    target_token_id: int | None


class GraphHeader(BaseModel):
    run: RunRef
    id: int
    slug: str
    prompt: str
    prompt_id: int | None
    prompt_tokens: list[Tok]
    position: int | None = Field(description="The position whose next token the graph explains.")
    target_token: str | None
    target_token_id: int | None
    mode: str | None
    non_feature_nodes: str = Field(description="What the graph's non-feature nodes are, in words.")
    params: dict[str, Any]
    scores: dict[str, Any]
    n_nodes: int | None
    n_links: int | None
    approx_bytes: int | None = Field(description="Rough size of the whole graph's JSON, shown before loading.")
    large: bool = Field(description="True when the page asks before loading the whole graph.")
    node_threshold: float | None
    logit_diff: list[str] | None = Field(None, description="[A, B] token texts of a default logit difference.")
    no_feature_message: str | None = None
    ablate: AblateTarget | None = Field(None, description="None: the graph has no stored prompt to ablate on.")
    imported: bool = False
    output_features: list[GraphFeature]
    template_features: list[GraphFeature]
    other_features: list[GraphFeature]


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


class GraphPage(GraphHeader):
    """The header plus every node and link (the API's JSON twin of the page)."""

    nodes: list[GraphNode]
    links: list[GraphLink]
    max_abs_weight: float


def _graph_meta(session: Session, run_id: int, graph_id: int) -> Any:
    """The graph row without its nodes and links (which can be large)."""
    row = session.execute(
        select(Graph.id, Graph.run_id, Graph.slug, Graph.prompt, Graph.prompt_id, Graph.target_token_id,
               Graph.target_token_str, Graph.position, Graph.params, Graph.scores)
        .where(Graph.id == graph_id)).first()
    if row is None or row.run_id != run_id:
        raise NotFound(f"No graph {graph_id} in run {run_id}.")
    return row


def _graph(session: Session, run_id: int, graph_id: int) -> Graph:
    g = session.get(Graph, graph_id)
    if g is None or g.run_id != run_id:
        raise NotFound(f"No graph {graph_id} in run {run_id}.")
    return g


def _prompt_tokens(session: Session, g: Any, vocab: Vocab, words: tuple[str, ...]) -> list[Tok]:
    params = g.params or {}
    if g.prompt_id is not None:
        p = session.get(Prompt, g.prompt_id)
        if p is not None and p.token_ids:
            return token_views(vocab, list(p.token_ids), None, words)
    ids = params.get("prompt_token_ids")
    if isinstance(ids, list) and ids and not params.get("imported"):
        return token_views(vocab, ids, None, words)
    texts = params.get("prompt_tokens")
    if isinstance(texts, list):
        return [Tok(id=int(ids[i]) if isinstance(ids, list) and i < len(ids) else -1, text=str(t))
                for i, t in enumerate(texts)]
    return []


def _features_by_role(session: Session, run_id: int, keys: set[tuple[int, int]], positions: dict, vocab: Vocab,
                      limit: int | None = ROLE_LIST_MAX) -> dict[str, list[GraphFeature]]:
    """The page's lists: every output and template feature, the others up to ``limit`` (a big graph's
    thousands are in the viewer); only the listed features' rows are read."""
    _, roles = _feature_rows(session, run_id, keys, with_lens=False, with_rows=False)
    role_of = {k: roles.get(k, (None, None))[0] for k in keys}
    listed = sorted(k for k in keys if role_of[k] in ("output", "template"))
    others = sorted(k for k in keys if role_of[k] not in ("output", "template"))
    listed += others[:limit] if limit is not None else others
    info, _ = _feature_rows(session, run_id, set(listed), with_roles=False)
    by_role: dict[str, list[GraphFeature]] = {"output": [], "template": [], "other": []}
    for key in listed:
        r = info.get(key)
        role, score = roles.get(key, (None, None))
        top = _lens_texts(r.logit_lens, "top", vocab, 1) if r else []
        f = GraphFeature(layer=key[0], index=key[1], role=role, score=score, label=r.label if r else None,
                         top_token=top[0] if top else None, positions=sorted(positions.get(key, [])))
        by_role[role if role in ("output", "template") else "other"].append(f)
    return by_role


def _feature_rows(session: Session, run_id: int, keys: set[tuple[int, int]], *, with_lens: bool = True,
                  with_rows: bool = True, with_roles: bool = True) -> tuple[dict, dict]:
    """Feature rows (label, frequency, max_act and, ``with_lens``, the logit lens: JSON, the costly part)
    and hesitation-set roles for ``keys``, in chunks."""
    info: dict[tuple[int, int], Any] = {}
    roles: dict[tuple[int, int], tuple[str | None, float | None]] = {}
    hset = hesitation_set(session, run_id) if with_roles else None
    key_list = sorted(keys)
    cols = [Feature.layer, Feature.index, Feature.label, Feature.frequency, Feature.max_act]
    if with_lens:
        cols.append(Feature.logit_lens)
    for chunk in (key_list[i:i + 500] for i in range(0, len(key_list), 500)):
        if with_rows:
            for r in session.execute(select(*cols).where(Feature.run_id == run_id,
                                                         keys_condition(Feature.layer, Feature.index, chunk))):
                info[(r.layer, r.index)] = r
        if hset is not None:
            for m in session.execute(
                select(FeatureSetMember.layer, FeatureSetMember.index, FeatureSetMember.role, FeatureSetMember.score)
                .where(FeatureSetMember.set_id == hset.id,
                       keys_condition(FeatureSetMember.layer, FeatureSetMember.index, chunk))
            ):
                roles[(m.layer, m.index)] = (m.role, m.score)
    return info, roles


def _lens_texts(lens: Any, side: str, vocab: Vocab, n: int) -> list[str]:
    """Up to ``n`` logit-lens token texts; padded-vocabulary ids are never tokens, so they are skipped."""
    out = []
    for e in (lens or {}).get(side) or [] if isinstance(lens, dict) else []:
        if not isinstance(e, list | tuple) or len(e) < 2:
            continue
        tid = e[0] if isinstance(e[0], int) else None
        if tid is not None and vocab.tokenizer is not None and not vocab.is_token(tid):
            continue
        out.append(e[1] if isinstance(e[1], str) else vocab.text(tid) if tid is not None else "?")
        if len(out) >= n:
            break
    return out


def _feature_key(node: dict[str, Any]) -> tuple[int, int] | None:
    """(layer, index) of a feature node: from ``{layer}_{index}_{pos}``, else the cantor-paired ``feature``."""
    parts = str(node.get("node_id", "")).split("_")
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
        return int(parts[0]), int(parts[1])
    if isinstance(node.get("feature"), int) and node["feature"] >= 0:
        return cantor_unpair(node["feature"])
    return None


def _logit_text(node: dict[str, Any], vocab: Vocab) -> str:
    clerp = str(node.get("clerp") or "")
    if clerp.startswith('Output "') and '" (p=' in clerp:
        return clerp[len('Output "'):clerp.rindex('" (p=')]
    tid = node.get("feature")
    return vocab.text(tid) if isinstance(tid, int) else clerp


def _ablate_target(g: Any) -> AblateTarget | None:
    """None for a graph whose token ids are not this run's (an imported graph of another model)."""
    params = g.params or {}
    if g.position is None:
        return None
    common = {"prompt_tokens": g.position + 1, "target_token_id": g.target_token_id}
    if g.prompt_id is not None:
        return AblateTarget(source="prompt_id", prompt_id=g.prompt_id, **common)
    ids = params.get("prompt_token_ids")
    ours = not params.get("imported") or (params.get("metadata") or {}).get("adapterlens")
    if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids) and ours:
        return AblateTarget(source="token_ids", token_ids=ids, **common)
    return None


def no_feature_message(scores: dict[str, Any], node_threshold: float | None) -> str | None:
    """What the page says when pruning kept no feature node (as the job's result does)."""
    if not scores.get("no_features"):
        return None
    share, show = scores.get("feature_influence_share"), scores.get("threshold_to_show_features")
    text = f"Pruning at node threshold {node_threshold:g} keeps no feature" if node_threshold is not None else \
        "Pruning kept no feature"
    if isinstance(share, int | float):
        text += f": features carry {100 * share:.1f}% of the influence on the logits"
    if isinstance(show, int | float):
        text += f"; node threshold {show:g} would show at least one (adapterlens attribute --node-threshold {show:g})"
    else:
        text += "; no node threshold shows one at this edge threshold (raise --edge-threshold)"
    return text + "."


def graph_header(session: Session, run_key: str | int, graph_id: int, *, with_roles: bool = True) -> GraphHeader:
    """The page's header: everything but the nodes and links (see the module docstring).

    ``with_roles``: also list the graph's features by role (reads the node column, unless the graph is
    large, whose lists the viewer shows once loaded)."""
    run = get_run(session, run_key)
    g = _graph_meta(session, run.id, graph_id)
    params, scores = g.params or {}, g.scores or {}
    vocab, words = run_vocab(session, run), hesitation_words(run)
    n_nodes, n_links = scores.get("n_nodes"), scores.get("n_links")
    approx = n_nodes * BYTES_PER_NODE + n_links * BYTES_PER_LINK if isinstance(n_nodes, int) and isinstance(
        n_links, int) else None
    node_threshold = as_float(params.get("node_threshold"))
    diff = params.get("logit_diff")
    logit_diff = None
    if isinstance(diff, list) and len(diff) == 2 and all(isinstance(t, int) for t in diff):
        logit_diff = [vocab.text(diff[0]), vocab.text(diff[1])]
    large = bool(approx and approx > LARGE_GRAPH_BYTES)
    lists = role_lists(session, run, g.id) if with_roles and not large else {"output": [], "template": [], "other": []}
    return GraphHeader(
        run=run_ref(run), id=g.id, slug=g.slug, prompt=g.prompt, prompt_id=g.prompt_id,
        prompt_tokens=_prompt_tokens(session, g, vocab, words), position=g.position, target_token=g.target_token_str,
        target_token_id=g.target_token_id, mode=params.get("mode"),
        non_feature_nodes=str(params.get("non_feature_nodes") or non_feature_nodes(params.get("mode"))),
        params={k: v for k, v in params.items() if k not in ("metadata", "prompt_tokens", "prompt_token_ids")},
        scores=scores, n_nodes=n_nodes, n_links=n_links, approx_bytes=approx,
        large=large, node_threshold=node_threshold, logit_diff=logit_diff,
        no_feature_message=no_feature_message(scores, node_threshold), ablate=_ablate_target(g),
        imported=bool(params.get("imported")), output_features=lists["output"],
        template_features=lists["template"], other_features=lists["other"],
    )


def graph_page(session: Session, run_key: str | int, graph_id: int) -> GraphPage:
    """The header plus every node (with its feature's label, role and top tokens) and link."""
    header = graph_header(session, run_key, graph_id, with_roles=False)
    run = get_run(session, run_key)
    g = _graph(session, run.id, graph_id)
    vocab = run_vocab(session, run)
    raw_nodes = [n for n in (g.nodes or []) if isinstance(n, dict) and "node_id" in n]
    keys, positions = set(), {}
    for n in raw_nodes:
        if node_kind(str(n.get("feature_type", ""))) == "feature" and (key := _feature_key(n)) is not None:
            keys.add(key)
            positions.setdefault(key, []).append(int(n.get("ctx_idx", 0) or 0))
    info, roles = _feature_rows(session, run.id, keys)
    nodes = []
    for n in raw_nodes:
        kind = node_kind(str(n.get("feature_type", "")))
        fl = _feature_key(n) if kind == "feature" else None
        r = info.get(fl) if fl else None
        top = _lens_texts(r.logit_lens, "top", vocab, 5) if r else []
        nodes.append(GraphNode(
            node_id=str(n["node_id"]), kind=kind, layer=str(n.get("layer", "")), ctx_idx=int(n.get("ctx_idx", 0) or 0),
            feature=n.get("feature") if isinstance(n.get("feature"), int) else None, fl=fl,
            clerp=n.get("clerp") or None, influence=as_float(n.get("influence")),
            activation=as_float(n.get("activation")), role=n.get("role") or (roles.get(fl, (None, None))[0] if fl else None),
            top_token=top[0] if top else None, label=r.label if r else None, top_tokens=top,
        ))
    node_ids = {n.node_id for n in nodes}
    links = [GraphLink(source=str(e["source"]), target=str(e["target"]), weight=float(e["weight"]))
             for e in (g.links or []) if isinstance(e, dict) and e.get("source") in node_ids
             and e.get("target") in node_ids and as_float(e.get("weight")) is not None]
    by_role = _features_by_role(session, run.id, keys, positions, vocab, limit=None)
    return GraphPage(**{**header.model_dump(), "output_features": by_role["output"],
                        "template_features": by_role["template"], "other_features": by_role["other"]},
                     nodes=nodes, links=links, max_abs_weight=max((abs(e.weight) for e in links), default=0.0))


def role_lists(session: Session, run: Any, graph_id: int) -> dict[str, list[GraphFeature]]:
    """The page's feature lists by role (reads the node column once)."""
    nodes = session.scalar(select(Graph.nodes).where(Graph.id == graph_id)) or []
    keys, positions = set(), {}
    for n in nodes:
        if isinstance(n, dict) and node_kind(str(n.get("feature_type", ""))) == "feature":
            key = _feature_key(n)
            if key is not None:
                keys.add(key)
                positions.setdefault(key, []).append(int(n.get("ctx_idx", 0) or 0))
    return _features_by_role(session, run.id, keys, positions, run_vocab(session, run))


def graph_view(session: Session, run_key: str | int, graph_id: int, *, pruning_threshold: float | None = None,
               max_nodes: int | None = MAX_VIEW_NODES, keep: set[str] | None = None) -> dict[str, Any]:
    """The viewer's data: nodes and links as columns, cut on the server (see the module docstring)."""
    if pruning_threshold is not None and not (0.0 <= pruning_threshold <= 1.0 and math.isfinite(pruning_threshold)):
        raise ValueError(f"pruningThreshold must lie in [0, 1], got {pruning_threshold}")
    run = get_run(session, run_key)
    g = _graph(session, run.id, graph_id)
    vocab = run_vocab(session, run)
    keep = keep or set()
    raw = [n for n in (g.nodes or []) if isinstance(n, dict) and "node_id" in n]
    kinds = [node_kind(str(n.get("feature_type", ""))) for n in raw]
    infl = [as_float(n.get("influence")) for n in raw]
    # the server's cut: feature and error nodes by cumulative influence (never tokens, logits or kept ids)
    cuttable = [i for i, k in enumerate(kinds) if k in ("feature", "error") and raw[i]["node_id"] not in keep]
    dropped: set[int] = set()
    if pruning_threshold is not None:
        dropped |= {i for i in cuttable if infl[i] is not None and infl[i] > pruning_threshold}
    left = [i for i in cuttable if i not in dropped]
    if max_nodes is not None and len(left) > max_nodes:
        left.sort(key=lambda i: (infl[i] if infl[i] is not None else 2.0))
        dropped |= set(left[max_nodes:])
    sent = [i for i in range(len(raw)) if i not in dropped]
    index = {raw[i]["node_id"]: k for k, i in enumerate(sent)}
    cut_at = min((infl[i] for i in dropped if infl[i] is not None), default=None)
    keys = {key for i in sent if kinds[i] == "feature" and (key := _feature_key(raw[i])) is not None}
    info, roles = _feature_rows(session, run.id, keys, with_lens=False)
    cols: dict[str, list[Any]] = {k: [] for k in ("id", "kind", "layer", "pos", "index", "influence", "activation",
                                                  "clerp", "prob", "target")}
    for i in sent:
        n, kind = raw[i], kinds[i]
        layer = str(n.get("layer", ""))
        if kind == "feature":
            key = _feature_key(n)
            idx = key[1] if key else -1
        elif kind == "embedding":
            parts = str(n["node_id"]).split("_")
            idx = int(parts[1]) if len(parts) == 3 and parts[1].lstrip("-").isdigit() else -1
        elif kind == "logit":
            idx = int(n["feature"]) if isinstance(n.get("feature"), int) else -1
        else:
            idx = -1
        cols["id"].append(str(n["node_id"]))
        cols["kind"].append(KIND_CODE[kind])
        cols["layer"].append(int(layer) if layer.lstrip("-").isdigit() else -1)
        cols["pos"].append(int(n.get("ctx_idx", 0) or 0))
        cols["index"].append(idx)
        cols["influence"].append(infl[i])
        cols["activation"].append(as_float(n.get("activation")))
        cols["clerp"].append(_logit_text(n, vocab) if kind == "logit" else str(n.get("clerp") or ""))
        cols["prob"].append(as_float(n.get("token_prob")) or 0.0)
        cols["target"].append(bool(n.get("is_target_logit")))
    src, tgt, w = [], [], []
    n_links_total = 0
    for e in g.links or []:
        if not isinstance(e, dict):
            continue
        n_links_total += 1
        s, t = index.get(e.get("source")), index.get(e.get("target"))
        wt = as_float(e.get("weight"))
        if s is None or t is None or wt is None or not math.isfinite(wt):
            continue
        src.append(s)
        tgt.append(t)
        w.append(wt)
    features = {}  # what the filters and labels need; the logit lens comes with the cards, on click
    for key in keys:
        r = info.get(key)
        features[f"{key[0]}/{key[1]}"] = {"label": r.label if r else None, "frequency": r.frequency if r else None,
                                          "max_act": r.max_act if r else None, "role": roles.get(key, (None, None))[0]}
    return {
        "graph_id": g.id, "n_nodes_total": len(raw), "n_links_total": n_links_total, "n_nodes_sent": len(sent),
        "n_not_sent": len(dropped), "cut_at_influence": cut_at, "pruning_threshold": pruning_threshold,
        "n_layers": _n_layers(raw, kinds), "nodes": cols, "links": {"source": src, "target": tgt, "weight": w},
        "features": features,
    }


def feature_cards(session: Session, run_key: str | int, keys: list[tuple[int, int]]) -> dict[str, Any]:
    """Mini feature cards (label, top and bottom logit tokens without padded ids, frequency, role), fetched by
    the viewer when a node is clicked, as circuit-tracer fetches feature files lazily."""
    if len(keys) > MAX_CARDS:
        raise ValueError(f"at most {MAX_CARDS} features per request, got {len(keys)}")
    run = get_run(session, run_key)
    vocab = run_vocab(session, run)
    info, roles = _feature_rows(session, run.id, set(keys))
    out = {}
    for key in keys:
        r = info.get(key)
        out[f"{key[0]}/{key[1]}"] = {
            "label": r.label if r else None,
            "top": _lens_texts(r.logit_lens, "top", vocab, CARD_TOKENS) if r else [],
            "bottom": _lens_texts(r.logit_lens, "bottom", vocab, CARD_TOKENS) if r else [],
            "frequency": r.frequency if r else None, "max_act": r.max_act if r else None,
            "role": roles.get(key, (None, None))[0], "collected": r is not None,
        }
    return out


def _n_layers(raw: list[dict], kinds: list[str]) -> int:
    """The model's layer count: the logit row is ``n_layers + 1`` (circuit-tracer), else 1 + the top layer."""
    logit_layers = [int(n["layer"]) for n, k in zip(raw, kinds, strict=True)
                    if k == "logit" and str(n.get("layer", "")).isdigit()]
    if logit_layers:
        return max(logit_layers) - 1
    layers = [int(n["layer"]) for n, k in zip(raw, kinds, strict=True) if k in ("feature", "error")
              and str(n.get("layer", "")).isdigit()]
    return max(layers, default=-1) + 1


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
    stored = params.get("metadata") if isinstance(params.get("metadata"), dict) else None
    if stored is not None:
        metadata = json.loads(json.dumps(stored))  # a copy: the file as it was written (or imported)
        metadata["slug"] = g.slug
    else:  # rows written before the metadata was kept: rebuild it from the columns
        node_threshold = as_float(params.get("node_threshold"))
        toks = _prompt_tokens(session, g, run_vocab(session, run), hesitation_words(run))
        metadata = {
            "slug": g.slug, "scan": str(params.get("scan") or f"adapterlens-run-{run.id}"),
            "transcoder_list": list(params.get("transcoder_list") or []),
            "prompt_tokens": _exact_texts(session, run, toks), "prompt": g.prompt, "node_threshold": node_threshold,
            "schema_version": SCHEMA_VERSION,
            "info": {"description": f"AdapterLens run {run.name}: {run.base_model} → {run.target_model}",
                     "generator": {"name": "adapterlens", "version": "0.1.0", "url": ""},
                     "create_time_ms": int(g.created.timestamp() * 1000) if g.created else None},
            "pruning_settings": {"node_threshold": node_threshold,
                                 "edge_threshold": as_float(params.get("edge_threshold"))},
            "adapterlens": {"run_id": run.id, "graph_id": g.id, "target_token": g.target_token_str,
                            "position": g.position, "mode": params.get("mode"),
                            "non_feature_nodes": non_feature_nodes(params.get("mode"))},
        }
    qparams = params.get("qParams") if isinstance(params.get("qParams"), dict) else {}
    data = {"metadata": metadata, "qParams": qparams, "nodes": list(g.nodes or []), "links": list(g.links or [])}
    try:
        return GraphFile.model_validate(data).dump()
    except ValueError as exc:  # a row that no longer fits the format: say so rather than send a broken file
        raise GraphFormatError(f"graph {g.id} cannot be written as circuit-tracer JSON: {exc}") from None
