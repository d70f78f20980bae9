"""The attribution graph container, node influence and pruning (circuit-tracer's semantics).

Pure functions on tensors, like circuit-tracer's ``graph.py``: :func:`compute_node_influence` (the
influence of every node on the logits through the row-normalised |adjacency|, summed over all path
lengths), :func:`prune_graph` (keep the nodes covering ``node_threshold`` of the influence and the
edges covering ``edge_threshold`` of the edge influence, then drop feature nodes left without an
incoming or outgoing edge, repeatedly). The result, :class:`PrunedGraph`, is a plain node and link list
that the JSON export, the store and the pages use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

NodeKind = Literal["feature", "error", "token", "logit"]


@dataclass
class Graph:
    """The unpruned attribution graph of one prompt.

    Nodes, in this order: the selected features ``active_features[selected_features]`` (each a
    (layer, position, index) triple), one token node per input position, one logit node per logit
    target. ``adjacency_matrix[target, source]`` is the direct effect of source on target: rows are
    targets, columns sources (as in circuit-tracer; there are no error nodes: the adapter model itself
    is explained). Token rows are zero; a feature row holds edges only from lower layers and earlier or
    equal positions.

    Per row, completeness: ``adjacency.sum(1) + constant_contributions + dropped_contributions ==
    target_values`` (a feature's pre-activation, a logit's demeaned value) in the linearised model.
    ``constant_contributions``: biases, frozen MLP outputs (frozen-mlp) and features at an excluded BOS;
    ``dropped_contributions``: active features that are no nodes (beyond ``max_feature_nodes``).
    """

    input_ids: torch.Tensor  # [T]
    active_features: torch.Tensor  # [n_active, 3] (layer, position, index), every active non-BOS feature
    activation_values: torch.Tensor  # [n_active]
    selected_features: torch.Tensor  # [n_sel] indices into active_features: the feature nodes
    adjacency_matrix: torch.Tensor  # [n_nodes, n_nodes] rows = targets, columns = sources
    logit_tokens: torch.Tensor  # [n_logits] vocab ids
    logit_probabilities: torch.Tensor  # [n_logits]
    target_values: torch.Tensor  # [n_nodes] value of each row's target (0 for tokens)
    constant_contributions: torch.Tensor  # [n_nodes]
    dropped_contributions: torch.Tensor  # [n_nodes]
    mode: str
    n_layers: int
    n_features_per_layer: int
    target_token: int | None = None
    settings: dict = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_feature_nodes(self) -> int:
        return int(self.selected_features.numel())

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_feature_nodes + self.n_pos + self.n_logits

    @property
    def feature_nodes(self) -> torch.Tensor:
        """(layer, position, index) of each feature node [n_sel, 3]."""
        return self.active_features[self.selected_features]

    @property
    def feature_activations(self) -> torch.Tensor:
        return self.activation_values[self.selected_features]

    def feature_node_index(self, layer: int, pos: int, index: int) -> int:
        """The node index of feature (layer, index) at ``pos``; KeyError when it is no node."""
        hit = (self.feature_nodes == torch.tensor([layer, pos, index])).all(1).nonzero()
        if hit.numel() == 0:
            raise KeyError(f"feature ({layer}, {index}) at position {pos} is not a node of this graph")
        return int(hit[0])

    def token_node_index(self, pos: int) -> int:
        return self.n_feature_nodes + pos

    def logit_node_index(self, token_id: int) -> int:
        hit = (self.logit_tokens == token_id).nonzero()
        if hit.numel() == 0:
            raise KeyError(f"token {token_id} is not a logit node of this graph")
        return self.n_feature_nodes + self.n_pos + int(hit[0])

    def save(self, path: str) -> None:
        """Write the graph with ``torch.save`` (tensors and plain values only, so loading needs no pickle)."""
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: str) -> Graph:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    def logit_weights(self) -> torch.Tensor:
        """Per node: the logit probability on logit nodes, 0 elsewhere (the influence seed)."""
        w = torch.zeros(self.n_nodes, dtype=self.adjacency_matrix.dtype)
        w[-self.n_logits:] = self.logit_probabilities.to(w.dtype)
        return w


# -- influence and pruning (circuit-tracer semantics, our code) ---------------------------------------------


def normalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows of zeros stay zero)."""
    a = matrix.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(normalized: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``w A + w A² + …`` until the products vanish (the graph is acyclic, so they do)."""
    cur = weights @ normalized
    total = cur.clone()
    for _ in range(max_iter):
        if not bool(cur.any()):
            return total
        cur = cur @ normalized
        total += cur
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (is the graph acyclic?)")


def compute_node_influence(adjacency: torch.Tensor, logit_weights: torch.Tensor) -> torch.Tensor:
    """Each node's total influence on the weighted logits [n_nodes]."""
    return influence(normalize_rows(adjacency), logit_weights)


def compute_edge_influence(adjacency: torch.Tensor, logit_weights: torch.Tensor) -> torch.Tensor:
    """Each edge's share of the influence flowing into its target [n_nodes, n_nodes]."""
    norm = normalize_rows(adjacency)
    through = influence(norm, logit_weights) + logit_weights
    return norm * through[:, None]


def score_threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the top scores whose sum first reaches ``fraction`` of the total."""
    s = scores.flatten().sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return s.new_tensor(float("inf"))
    cum = s.cumsum(0) / total
    i = int(torch.searchsorted(cum, cum.new_tensor(fraction)))
    i = min(i, max(int((s > 0).sum()) - 1, 0))  # never a zero cut-off, which would keep non-edges
    return s[i]


@dataclass(frozen=True)
class GraphNode:
    """One node of a pruned graph. ``index``: feature index, or vocab id for token and logit nodes."""

    kind: NodeKind
    pos: int
    index: int
    layer: int | None = None  # features and errors
    activation: float | None = None
    influence: float | None = None  # raw influence on the logits
    cumulative_influence: float | None = None  # circuit-tracer's node "influence": cumulative share
    token_prob: float = 0.0  # logits
    is_target_logit: bool = False


@dataclass
class PrunedGraph:
    """A pruned graph as lists: nodes (features, errors, tokens, logits) and links by node position."""

    nodes: list[GraphNode]
    links: list[tuple[int, int, float]]  # (source node, target node, weight = adjacency[target, source])
    input_ids: list[int]
    n_layers: int
    mode: str | None = None
    node_threshold: float | None = None
    edge_threshold: float | None = None
    logit_position: int | None = None
    settings: dict = field(default_factory=dict)

    def features(self) -> list[GraphNode]:
        return [n for n in self.nodes if n.kind == "feature"]

    def feature_ids(self) -> set[tuple[int, int]]:
        """Distinct (layer, index) feature ids, over positions."""
        return {(n.layer, n.index) for n in self.nodes if n.kind == "feature"}


@dataclass
class PruneMasks:
    """What :func:`prune_masks` keeps, over the unpruned graph's nodes."""

    node_mask: torch.Tensor  # [n_nodes] bool
    edge_mask: torch.Tensor  # [n_nodes, n_nodes] bool, [target, source]
    node_influence: torch.Tensor  # [n_nodes]
    cumulative_scores: torch.Tensor  # [n_nodes] share of influence of all nodes at least as influential


def prune_masks(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneMasks:
    """circuit-tracer's pruning on ``graph``: node threshold, edge threshold, then iterated clean-up."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")
    adj = graph.adjacency_matrix.double()
    n_fixed = graph.n_pos + graph.n_logits  # tokens and logits are always kept
    n_feat = graph.n_feature_nodes
    w = graph.logit_weights().double()
    node_infl = compute_node_influence(adj, w)
    node_mask = node_infl >= score_threshold(node_infl, node_threshold)
    node_mask[-n_fixed:] = True
    pruned = adj.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    edge_scores = compute_edge_influence(pruned, w)
    edge_mask = edge_scores >= score_threshold(edge_scores, edge_threshold)
    edge_mask &= pruned != 0
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:n_feat] &= edge_mask[:, :n_feat].any(0)  # a feature must feed something kept
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)  # and be fed by something kept
        if bool((node_mask == before).all()):
            break
    order = node_infl.sort(descending=True)
    total = node_infl.sum().clamp(min=1e-30)
    cumulative = torch.empty_like(node_infl)
    cumulative[order.indices] = order.values.cumsum(0) / total
    return PruneMasks(node_mask, edge_mask, node_infl, cumulative)


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Prune ``graph`` (circuit-tracer's semantics) into node and link lists, with activation and influence."""
    m = prune_masks(graph, node_threshold, edge_threshold)
    n_feat, T = graph.n_feature_nodes, graph.n_pos
    keep = m.node_mask.nonzero().squeeze(1).tolist()
    new_index = {old: new for new, old in enumerate(keep)}
    feats, acts = graph.feature_nodes.tolist(), graph.feature_activations.tolist()
    infl, cum = m.node_influence.tolist(), m.cumulative_scores.tolist()
    target = graph.target_token
    if target is None:
        target = int(graph.logit_tokens[0]) if graph.n_logits else None
    nodes = []
    for i in keep:
        if i < n_feat:
            layer, pos, idx = feats[i]
            nodes.append(GraphNode("feature", pos, idx, layer, acts[i], infl[i], cum[i]))
        elif i < n_feat + T:
            pos = i - n_feat
            nodes.append(GraphNode("token", pos, int(graph.input_ids[pos]), None, None, infl[i], cum[i]))
        else:
            k = i - n_feat - T
            tok = int(graph.logit_tokens[k])
            nodes.append(GraphNode("logit", T - 1, tok, None, None, infl[i], cum[i],
                                   float(graph.logit_probabilities[k]), tok == target))
    tgt, src = m.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix[tgt, src].tolist()
    links = [(new_index[s], new_index[t], wt) for t, s, wt in zip(tgt.tolist(), src.tolist(), weights, strict=True)]
    return PrunedGraph(nodes=nodes, links=links, input_ids=graph.input_ids.tolist(), n_layers=graph.n_layers,
                       mode=graph.mode, node_threshold=node_threshold, edge_threshold=edge_threshold,
                       logit_position=T - 1, settings=dict(graph.settings))
