"""The exchange formats AdapterLens reads and writes, as our own pydantic models (torch-free).

- **Graph JSON** (circuit-tracer's viewer, Neuronpedia): ``metadata``, ``qParams``, ``nodes``, ``links``.
  Field names and required fields follow circuit-tracer's ``frontend/graph_models.py`` (every field its
  ``Model`` requires is required here too, so a file valid here validates there); Neuronpedia's optional
  metadata (``info``, ``generation_settings``, ``pruning_settings``, ``feature_details``) is modelled, and
  our own data lives only under new optional keys (``metadata.adapterlens``, node ``raw_influence``),
  which both readers ignore.
- **Feature JSON** (what those viewers fetch per feature): circuit-tracer's ``frontend/feature_models.py``.
- **Transcripts** (JSONL, one object per line): ablation tokens and experiment rows.

Node ids, as circuit-tracer writes them:

========== ============================= ======= ============================ ==========================
kind       node_id                       layer   feature                      jsNodeId
========== ============================= ======= ============================ ==========================
feature    ``{layer}_{index}_{pos}``     layer   cantor pair (layer, index)   ``{layer}_{index}-0``
error      ``{layer}_-1_{pos}`` (≥0.5.1) layer   -1                           ``{layer}_-1-{pos}``
error      ``0_{layer}_{pos}`` (≤0.5.0)  layer   -1                           ``{layer}_{pos}-0``
embedding  ``E_{vocab}_{pos}``           ``E``   pos                          ``E_{vocab}-{pos}``
logit      ``{L+1}_{vocab}_{pos}``       L+1     vocab id                     ``L_{vocab}-{pos}``
========== ============================= ======= ============================ ==========================

The old error id collides with a layer-0 feature's (``0_5_3`` is error (5, 3) and feature (0, 5) at 3),
so :func:`normalize_graph` reads error nodes by ``feature_type`` and rewrites them (and the links that
name them) in the current form; :func:`error_node_id` writes the current form only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FEATURE_TYPE = "cross layer transcoder"  # what circuit-tracer writes for any transcoder feature
ERROR_TYPE = "mlp reconstruction error"
EMBEDDING_TYPE = "embedding"
LOGIT_TYPE = "logit"
SCHEMA_VERSION = 1  # circuit-tracer's graph JSON schema_version (2026 releases)
GENERATOR = {"name": "adapterlens", "version": "0.1.0", "url": "https://github.com/adapterlens/adapterlens"}
MAX_IMPORT_NODES = 200_000  # a graph file with more nodes is refused (the viewer could not draw it anyway)
MAX_IMPORT_LINKS = 5_000_000

NodeKind = Literal["feature", "error", "embedding", "logit"]

# What the non-feature nodes of a graph are, per attribution mode (the page and the metadata say it).
NON_FEATURE_NODES = {
    "frozen-mlp": ("Error nodes (◆) are the frozen base-MLP output at each layer and position: the part of "
                   "the MLP output that no adapter feature explains, as circuit-tracer's reconstruction-"
                   "error nodes. Token embeddings (■ bottom) and logits (■ top) are the other non-feature "
                   "nodes; biases are per-node constants, not nodes."),
    "relp": ("No error nodes: in relp mode the base MLP is linearised (half rule, σ frozen) and passes "
             "effects through, so every edge ends at an adapter feature, a token embedding (■ bottom) or "
             "a logit (■ top); biases are per-node constants, not nodes. Replacement and completeness "
             "scores are 1 by construction and not shown."),
}


def non_feature_nodes(mode: str | None) -> str:
    """What a graph's non-feature nodes are, in words."""
    return NON_FEATURE_NODES.get(mode or "", "Imported graph: error nodes (◆), when present, are the "
                                             "producer's reconstruction errors.")


# -- ids -------------------------------------------------------------------------------------------------


def cantor_pair(layer: int, index: int) -> int:
    """circuit-tracer's ``feature`` field of a feature node (schema_version 1)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def cantor_unpair(z: int) -> tuple[int, int]:
    w = int((math.isqrt(8 * z + 1) - 1) // 2)
    index = z - w * (w + 1) // 2
    return w - index, index


def feature_node_id(layer: int, index: int, pos: int) -> str:
    return f"{layer}_{index}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    """The current (circuit-tracer ≥ 0.5.1) error id; see the module docstring for the old one."""
    return f"{layer}_-1_{pos}"


def error_js_id(layer: int, pos: int) -> str:
    return f"{layer}_-1-{pos}"


def token_node_id(vocab_id: int, pos: int) -> str:
    return f"E_{vocab_id}_{pos}"


def logit_node_id(n_layers: int, vocab_id: int, pos: int) -> str:
    return f"{n_layers + 1}_{vocab_id}_{pos}"


def node_kind(feature_type: str) -> NodeKind:
    """The viewer's rule: embeddings, logits and errors by name; any other type is a feature."""
    if feature_type == EMBEDDING_TYPE:
        return "embedding"
    if feature_type == LOGIT_TYPE:
        return "logit"
    if "error" in feature_type:
        return "error"
    return "feature"


# -- graph JSON ------------------------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class GeneratorInfo(_Open):
    name: str | None = None
    version: str | None = None
    url: str | None = None


class Info(_Open):
    description: str | None = None
    creator_name: str | None = None
    creator_url: str | None = None
    source_urls: list[str] | None = None
    generator: GeneratorInfo | None = None
    create_time_ms: float | None = None


class PruningSettings(_Open):
    node_threshold: float | None = None
    edge_threshold: float | None = None


class GraphMetadata(_Open):
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = SCHEMA_VERSION
    info: Info | None = None
    generation_settings: dict[str, Any] | None = None
    pruning_settings: PruningSettings | None = None
    feature_details: dict[str, Any] | None = None


class QParams(_Open):
    pinnedIds: list[str] = Field(default_factory=list)
    supernodes: list[list[str]] = Field(default_factory=list)
    linkType: str = "both"
    clickedId: str = ""
    sg_pos: str = ""


class GraphNode(_Open):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None

    @property
    def kind(self) -> NodeKind:
        return node_kind(self.feature_type)


class GraphLink(_Open):
    source: str
    target: str
    weight: float

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("link weights must be finite")
        return v


class GraphFile(_Open):
    """The whole file; ``model_dump(mode="json", exclude_none=True)`` gives the JSON object."""

    metadata: GraphMetadata
    qParams: QParams = Field(default_factory=QParams)
    nodes: list[GraphNode]
    links: list[GraphLink]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class GraphFormatError(ValueError):
    """A graph file that cannot be read; the message names the offending part."""


def _problems(exc: ValidationError, limit: int = 5) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()[:limit]]
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _fill_node_defaults(node: Any) -> Any:
    """What circuit-tracer's own Node fills in (jsNodeId = node_id), plus ``feature`` for hand-written files."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "jsNodeId" not in out and "node_id" in out:
        out["jsNodeId"] = out["node_id"]
    if out.get("feature") is None:
        out["feature"] = -1
    return out


def normalize_graph(data: Any) -> GraphFile:
    """Read a graph file written by circuit-tracer (any release), Neuronpedia or AdapterLens.

    Error nodes get the current id form (the links follow); node ids must be unique and every link must
    name two nodes of the file. Raises :class:`GraphFormatError` with what is wrong.
    """
    if not isinstance(data, dict):
        raise GraphFormatError("a graph file is a JSON object with metadata, nodes and links")
    nodes = data.get("nodes")
    links = data.get("links")
    if not isinstance(nodes, list) or not isinstance(links, list):
        raise GraphFormatError("a graph file needs 'nodes' and 'links' lists")
    if len(nodes) > MAX_IMPORT_NODES or len(links) > MAX_IMPORT_LINKS:
        raise GraphFormatError(f"the file has {len(nodes)} nodes and {len(links)} links; the limits are "
                               f"{MAX_IMPORT_NODES} and {MAX_IMPORT_LINKS} (prune it first)")
    meta = dict(data.get("metadata") or {})
    meta.setdefault("transcoder_list", [])
    raw = {**data, "metadata": meta, "nodes": [_fill_node_defaults(n) for n in nodes],
           "qParams": data.get("qParams") or {}}
    try:
        f = GraphFile.model_validate(raw)
    except ValidationError as exc:
        raise GraphFormatError(f"not a circuit-tracer graph file: {_problems(exc)}") from None
    rename: dict[str, str] = {}
    for n in f.nodes:
        if n.kind != "error":
            continue
        try:
            layer, pos = int(n.layer), int(n.ctx_idx)
        except ValueError:
            raise GraphFormatError(f"error node {n.node_id!r} has layer {n.layer!r}, not a number") from None
        new = error_node_id(layer, pos)
        if n.node_id != new:
            rename[n.node_id] = new
        n.node_id, n.jsNodeId, n.feature = new, error_js_id(layer, pos), -1
    # An old error id that a layer-0 feature also has (the collision the new form fixes): the links that
    # name it cannot be told apart, so they stay with the feature.
    others = {n.node_id for n in f.nodes if n.kind != "error"}
    rename = {old: new for old, new in rename.items() if old not in others}
    seen: set[str] = set()
    for n in f.nodes:
        if n.node_id in seen:
            raise GraphFormatError(f"node id {n.node_id!r} appears twice")
        seen.add(n.node_id)
    for link in f.links:
        link.source = rename.get(link.source, link.source)
        link.target = rename.get(link.target, link.target)
        for end in (link.source, link.target):
            if end not in seen:
                raise GraphFormatError(f"link {link.source} -> {link.target} names {end!r}, which is not a node")
    q = f.qParams
    q.pinnedIds = [rename.get(i, i) for i in q.pinnedIds]
    q.supernodes = [[g[0], *(rename.get(i, i) for i in g[1:])] for g in q.supernodes if g]
    q.clickedId = rename.get(q.clickedId, q.clickedId)
    return f


def parse_node(node: GraphNode) -> tuple[NodeKind, int | None, int, int]:
    """(kind, layer, index, position) of a node: index is the feature index, vocab id, or -1 for errors."""
    kind = node.kind
    parts = node.node_id.split("_")
    try:
        if kind == "embedding":
            return kind, None, int(parts[1]), int(node.ctx_idx)
        if kind == "logit":
            return kind, None, int(parts[1]) if len(parts) == 3 else int(node.feature), int(node.ctx_idx)
        if kind == "error":
            return kind, int(node.layer), -1, int(node.ctx_idx)
        if len(parts) == 3:
            return kind, int(parts[0]), int(parts[1]), int(parts[2])
        layer, index = cantor_unpair(int(node.feature))
        return kind, layer, index, int(node.ctx_idx)
    except (ValueError, IndexError):
        raise GraphFormatError(f"cannot read node id {node.node_id!r} ({node.feature_type})") from None


# -- feature JSON ----------------------------------------------------------------------------------------


class FeatureExample(BaseModel):
    tokens: list[str]
    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool = False


class ExamplesQuantile(BaseModel):
    quantile_name: str
    examples: list[FeatureExample]


class FeatureFile(BaseModel):
    """circuit-tracer's feature detail file (what its viewer fetches as ``<scan>/<feature>.json``)."""

    model_config = ConfigDict(extra="allow")

    transcoder_id: str
    index: int
    examples_quantiles: list[ExamplesQuantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


# -- transcripts (JSONL) ---------------------------------------------------------------------------------


class AblationTranscriptLine(BaseModel):
    """One condition of an ablation (unablated, ablated, hybrid, target): the request and what was generated."""

    ablation_id: int
    run_id: int
    condition: str
    prompt: str
    features: list[tuple[int, int]]
    mode: str
    value: float | None = None
    positions: str
    status: str
    token_ids: list[int]
    tokens: list[str]
    text: str
    logprobs: list[float | None]
    kl: list[float | None]
    summary: dict[str, Any] | None = None


class ExperimentTranscriptLine(BaseModel):
    """One (prompt, condition) row of an experiment."""

    experiment_id: int
    run_id: int
    name: str
    prompt_idx: int
    condition: str
    prompt: str | None = None
    response_len: int | None = None
    hesitations: int | None = None
    correct: bool | None = None
    answer: str | None = None
    meta: dict[str, Any] | None = None
