"""The attribution graph container, node influence and pruning (circuit-tracer's semantics).

Pure functions on tensors, like circuit-tracer's ``graph.py``, with its definitions:

- :func:`compute_node_influence`: ``w A + w A² + …`` where ``A`` is |adjacency| with each row divided by
  its sum (over *every* source: features, error nodes, tokens) and ``w`` the logit probabilities;
- :func:`prune_masks` / :func:`prune_graph`: keep the nodes whose influence is at least the score at
  which the sorted influences' cumulative share first reaches ``node_threshold`` (tokens and logits
  always); score each remaining edge by its row-normalised weight times the influence of its target
  (plus the target's own logit weight) and keep those down to the cumulative ``edge_threshold``; then,
  repeatedly, drop feature and error nodes with no kept outgoing edge and feature nodes with no kept
  incoming edge. A node's ``influence`` in the JSON is the cumulative share at its rank;
- :func:`compute_graph_scores`: the replacement score (share of the token and error nodes' influence
  that the tokens hold) and the completeness score (per node, the share of its normalised input that does
  not come from error nodes, weighted by its influence plus logit weight).

One deliberate difference: when a threshold reaches the zero-score tail (e.g. 1.0), circuit-tracer's
cut-off becomes 0 and its mask then admits non-edges; :func:`score_threshold` stops at the smallest
positive score, so "keep everything" keeps every real edge and nothing else. The result,
:class:`PrunedGraph`, is a plain node and link list that the JSON export, the store and the pages use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

NodeKind = Literal["feature", "error", "token", "logit"]


@dataclass
class Graph:
    """The unpruned attribution graph of one prompt.

    Nodes, in this order (circuit-tracer's): the selected features ``active_features[selected_features]``
    (each a (layer, position, index) triple); in frozen-mlp mode ``n_layers × n_pos`` error nodes, the
    frozen base-MLP output at (layer, position) at index ``layer * n_pos + position`` (relp has none); one
    token node per input position; one logit node per logit target. ``adjacency_matrix[target, source]``
    is the direct effect of source on target: rows are targets, columns sources. Token and error rows are
    zero; a feature row holds edges only from lower layers and earlier or equal positions.

    Per row, completeness: ``adjacency.sum(1) + constant_contributions + dropped_contributions ==
    target_values`` (a feature's pre-activation, a logit's demeaned value) in the linearised model.
    ``constant_contributions``: biases and what an excluded BOS position writes;
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
    n_error_nodes: int = 0  # n_layers * n_pos in frozen-mlp mode, 0 in relp

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
        return self.n_feature_nodes + self.n_error_nodes + self.n_pos + self.n_logits

    @property
    def token_start(self) -> int:
        return self.n_feature_nodes + self.n_error_nodes

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

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

    def error_node_index(self, layer: int, pos: int) -> int:
        if not self.n_error_nodes:
            raise KeyError(f"a {self.mode} graph has no error nodes")
        return self.n_feature_nodes + layer * self.n_pos + pos

    def token_node_index(self, pos: int) -> int:
        return self.token_start + pos

    def logit_node_index(self, token_id: int) -> int:
        hit = (self.logit_tokens == token_id).nonzero()
        if hit.numel() == 0:
            raise KeyError(f"token {token_id} is not a logit node of this graph")
        return self.logit_start + int(hit[0])

    def save(self, path: str) -> None:
        """Write the graph with ``torch.save`` (tensors and plain values only, so loading needs no pickle)."""
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: str) -> Graph:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    def non_feature_nodes(self) -> str:
        """What the graph's non-feature nodes are (the page and the JSON metadata say it)."""
        return describe_non_feature_nodes(self.mode)

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
    n_src = graph.token_start  # features and error nodes: kept only while they feed something kept
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
        node_mask[:n_src] &= edge_mask[:, :n_src].any(0)  # a feature or error node must feed something kept
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)  # and a feature be fed by something kept
        if bool((node_mask == before).all()):
            break
    order = node_infl.sort(descending=True)
    total = node_infl.sum().clamp(min=1e-30)
    cumulative = torch.empty_like(node_infl)
    cumulative[order.indices] = order.values.cumsum(0) / total
    return PruneMasks(node_mask, edge_mask, node_infl, cumulative)


def compute_graph_scores(graph: Graph) -> tuple[float | None, float | None]:
    """circuit-tracer's (replacement score, completeness score) of the unpruned graph.

    Replacement: of the influence that token and error nodes hold, the share the tokens hold (1 when the
    computation reaches the logits from the tokens through features alone). Completeness: per node, the
    share of its row-normalised input that is not from error nodes, averaged with weights influence +
    logit weight. A relp graph has no error nodes, so both are 1 by construction: None is returned
    (the page says why) rather than a number that measures nothing.
    """
    if not graph.n_error_nodes:
        return None, None
    adj = graph.adjacency_matrix.double()
    w = graph.logit_weights().double()
    norm = normalize_rows(adj)
    infl = influence(norm, w)
    e0, e1 = graph.n_feature_nodes, graph.token_start
    token_infl = float(infl[e1:graph.logit_start].sum())
    error_infl = float(infl[e0:e1].sum())
    replacement = token_infl / (token_infl + error_infl) if token_infl + error_infl > 0 else None
    non_error = 1 - norm[:, e0:e1].sum(1)
    out = infl + w
    completeness = float((non_error * out).sum() / out.sum()) if float(out.sum()) > 0 else None
    return replacement, completeness


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Prune ``graph`` (circuit-tracer's semantics) into node and link lists, with activation and influence."""
    m = prune_masks(graph, node_threshold, edge_threshold)
    n_feat, T, n_err = graph.n_feature_nodes, graph.n_pos, graph.n_error_nodes
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
        elif i < n_feat + n_err:
            layer, pos = divmod(i - n_feat, T)
            nodes.append(GraphNode("error", pos, -1, layer, None, infl[i], cum[i]))
        elif i < graph.logit_start:
            pos = i - graph.token_start
            nodes.append(GraphNode("token", pos, int(graph.input_ids[pos]), None, None, infl[i], cum[i]))
        else:
            k = i - graph.logit_start
            tok = int(graph.logit_tokens[k])
            nodes.append(GraphNode("logit", T - 1, tok, None, None, None, None,  # targets: no influence of their own
                                   float(graph.logit_probabilities[k]), tok == target))
    tgt, src = m.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix[tgt, src].tolist()
    links = [(new_index[s], new_index[t], wt) for t, s, wt in zip(tgt.tolist(), src.tolist(), weights, strict=True)]
    return PrunedGraph(nodes=nodes, links=links, input_ids=graph.input_ids.tolist(), n_layers=graph.n_layers,
                       mode=graph.mode, node_threshold=node_threshold, edge_threshold=edge_threshold,
                       logit_position=T - 1, settings=dict(graph.settings))


def describe_non_feature_nodes(mode: str | None) -> str:
    """What a graph's non-feature nodes are, in words (the JSON metadata and the page carry it)."""
    from app.formats import non_feature_nodes

    return non_feature_nodes(mode)
