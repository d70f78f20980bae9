"""Pruning (circuit-tracer semantics) and the circuit-tracer graph JSON: export, import, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.formats import GraphFormatError, cantor_pair, cantor_unpair, normalize_graph
from tests.helpers import random_ids, tiny_pair
from training.adapter import build_adapter_model
from training.config import AdapterConfig
from worker.attribution.engine import attribute
from worker.attribution.export import from_circuit_tracer_json, to_circuit_tracer_json
from worker.attribution.graph import (
    Graph,
    compute_graph_scores,
    compute_node_influence,
    prune_graph,
    prune_masks,
)


class CharTokenizer:
    """Decodes id i as a letter: enough for labels (a stand-in for a Hugging Face tokenizer)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def hand_graph() -> Graph:
    """Features f0 (layer 0), f1 (layer 1), f2 (layer 1, weak); tokens t0, t1; one logit.

    f0 <- t0 (2.0); f1 <- f0 (1.0), t1 (1.0); f2 <- t1 (0.01); logit <- f1 (3.0), f0 (1.0), f2 (0.02).
    """
    n = 3 + 2 + 1
    adj = torch.zeros(n, n, dtype=torch.float64)
    F0, F1, F2, T0, T1, LG = range(n)
    adj[F0, T0] = 2.0
    adj[F1, F0], adj[F1, T1] = 1.0, 1.0
    adj[F2, T1] = 0.01
    adj[LG, F1], adj[LG, F0], adj[LG, F2] = 3.0, 1.0, 0.02
    active = torch.tensor([[0, 0, 5], [1, 1, 7], [1, 1, 9]])
    return Graph(input_ids=torch.tensor([3, 4]), active_features=active,
                 activation_values=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64),
                 selected_features=torch.arange(3), adjacency_matrix=adj, logit_tokens=torch.tensor([6]),
                 logit_probabilities=torch.tensor([0.5], dtype=torch.float64), target_values=torch.zeros(n),
                 constant_contributions=torch.zeros(n), dropped_contributions=torch.zeros(n), mode="relp",
                 n_layers=2, n_features_per_layer=16)


def test_node_influence_by_hand():
    g = hand_graph()
    infl = compute_node_influence(g.adjacency_matrix, g.logit_weights())
    # logit row normalised: f1 3/4.02, f0 1/4.02, f2 0.02/4.02; f1's row: f0 1/2, t1 1/2; f0's row: t0 1
    p = 0.5
    f1 = p * 3 / 4.02
    f2 = p * 0.02 / 4.02
    f0 = p * 1 / 4.02 + f1 * 0.5
    expected = torch.tensor([f0, f1, f2, f0 * 1.0, f1 * 0.5 + f2, 0.0], dtype=torch.float64)
    assert torch.allclose(infl, expected)


def test_prune_keeps_influential_and_drops_the_weak():
    g = hand_graph()
    everything = prune_masks(g, node_threshold=1.0, edge_threshold=1.0)
    assert everything.node_mask.all()
    m = prune_masks(g, node_threshold=0.9, edge_threshold=0.98)
    assert m.node_mask.tolist() == [True, True, False, True, True, True]  # f2 is weak; tokens/logits stay
    assert not m.edge_mask[:, 2].any() and not m.edge_mask[2].any()
    assert m.edge_mask[5, 1] and m.edge_mask[1, 0] and m.edge_mask[0, 3]
    # cumulative scores: the most influential node holds its own share, the least reaches 1
    assert float(m.cumulative_scores.max()) == pytest.approx(1.0)
    pruned = prune_graph(g, 0.9, 0.98)
    kinds = [n.kind for n in pruned.nodes]
    assert kinds == ["feature", "feature", "token", "token", "logit"]
    assert {(n.layer, n.index, n.pos) for n in pruned.features()} == {(0, 5, 0), (1, 7, 1)}
    by = {(n.kind, n.index): i for i, n in enumerate(pruned.nodes)}
    links = {(s, t): w for s, t, w in pruned.links}
    assert links[(by[("feature", 7)], by[("logit", 6)])] == 3.0
    assert pruned.nodes[by[("logit", 6)]].is_target_logit and pruned.nodes[by[("logit", 6)]].token_prob == 0.5
    assert pruned.nodes[by[("feature", 5)]].activation == 1.0
    with pytest.raises(ValueError, match="node_threshold"):
        prune_graph(g, node_threshold=1.5)


def test_pruning_leaves_no_dangling_features():
    g = hand_graph()
    g.adjacency_matrix[5, 2] = 0.0  # f2 now reaches nothing
    m = prune_masks(g, node_threshold=1.0, edge_threshold=1.0)
    assert not m.node_mask[2]


def hand_graph_with_errors() -> Graph:
    """Frozen-mlp shape: features f0 (layer 0, pos 0), f1 (layer 1, pos 1); error nodes e[layer][pos] for
    2 layers × 2 positions; tokens t0, t1; one logit (p = 0.5).

    f0 <- t0 (2); f1 <- f0 (1), t1 (1), e00 (2); logit <- f1 (3), e11 (-1), t1 (1); e01, e10 feed nothing.
    """
    F0, F1, E00, E01, E10, E11, T0, T1, LG = range(9)
    adj = torch.zeros(9, 9, dtype=torch.float64)
    adj[F0, T0] = 2.0
    adj[F1, F0], adj[F1, T1], adj[F1, E00] = 1.0, 1.0, 2.0
    adj[LG, F1], adj[LG, E11], adj[LG, T1] = 3.0, -1.0, 1.0
    zeros = torch.zeros(9, dtype=torch.float64)
    return Graph(input_ids=torch.tensor([3, 4]), active_features=torch.tensor([[0, 0, 5], [1, 1, 7]]),
                 activation_values=torch.tensor([1.0, 2.0], dtype=torch.float64), selected_features=torch.arange(2),
                 adjacency_matrix=adj, logit_tokens=torch.tensor([6]),
                 logit_probabilities=torch.tensor([0.5], dtype=torch.float64), target_values=zeros,
                 constant_contributions=zeros, dropped_contributions=zeros, mode="frozen-mlp", n_layers=2,
                 n_features_per_layer=16, n_error_nodes=4)


def test_error_nodes_take_their_share_of_influence_by_hand():
    """circuit-tracer's definitions, worked by hand: rows normalised over every source, errors included."""
    g = hand_graph_with_errors()
    assert (g.error_node_index(0, 0), g.error_node_index(1, 1), g.token_node_index(0), g.logit_node_index(6)) == \
        (2, 5, 6, 8)
    infl = compute_node_influence(g.adjacency_matrix, g.logit_weights())
    # logit row: f1 3/5, e11 1/5, t1 1/5 (× 0.5); f1's row: f0 1/4, t1 1/4, e00 2/4; f0's row: t0 1
    f1, e11 = 0.5 * 3 / 5, 0.5 * 1 / 5
    f0, e00 = f1 / 4, f1 / 2
    t1 = 0.5 / 5 + f1 / 4
    expected = [f0, f1, e00, 0.0, 0.0, e11, f0, t1, 0.0]
    assert infl.tolist() == pytest.approx(expected)
    replacement, completeness = compute_graph_scores(g)
    assert replacement == pytest.approx((f0 + t1) / (f0 + t1 + e00 + e11))  # 0.5
    # per row, 1 − (share of normalised input from errors), weighted by influence + logit weight
    out = [f0, f1, e00, 0, 0, e11, f0, t1, 0.5]
    non_error = [1, 1 - 2 / 4, 1, 1, 1, 1, 1, 1, 1 - 1 / 5]
    assert completeness == pytest.approx(sum(a * b for a, b in zip(out, non_error, strict=True)) / sum(out))
    assert compute_graph_scores(hand_graph()) == (None, None)  # relp: no error nodes, nothing to measure


def test_pruning_keeps_error_nodes_like_circuit_tracer():
    """Sorted influence f1 .3, t1 .175, e00 .15, e11 .1, f0 = t0 .075: the cumulative share first reaches
    0.8 at e11, so f0 (and the errors that feed nothing) go; e00 stays (an error needs only an outgoing
    edge); tokens and logits always stay."""
    g = hand_graph_with_errors()
    m = prune_masks(g, node_threshold=0.8, edge_threshold=1.0)
    assert m.node_mask.tolist() == [False, True, True, False, False, True, True, True, True]
    assert float(m.cumulative_scores[5]) == pytest.approx((0.3 + 0.175 + 0.15 + 0.1) / 0.875)
    pruned = prune_graph(g, 0.8, 1.0)
    assert [(n.kind, n.layer, n.pos) for n in pruned.nodes if n.kind in ("feature", "error")] == \
        [("feature", 1, 1), ("error", 0, 0), ("error", 1, 1)]
    m = prune_masks(g, node_threshold=0.6, edge_threshold=1.0)  # reaches 0.6 at e00: e11 (.1) goes too
    assert m.node_mask.tolist() == [False, True, True, False, False, False, True, True, True]
    data = to_circuit_tracer_json(prune_graph(g, 0.8, 1.0), CharTokenizer(), slug="h", scan="s")
    errs = [n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert [(n["node_id"], n["jsNodeId"], n["feature"]) for n in errs] == [("0_-1_0", "0_-1-0", -1),
                                                                          ("1_-1_1", "1_-1-1", -1)]
    assert "error" in data["metadata"]["adapterlens"]["non_feature_nodes"].lower()


@pytest.fixture(scope="module")
def real_pruned():
    base, target = tiny_pair(0, layers=2, d=32, init_std=0.3)
    model = build_adapter_model(base, target, AdapterConfig(n_features=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in model.adapters:
            ad.W_dec.copy_(0.2 * torch.randn(ad.W_dec.shape, generator=g))
            ad.b_enc.copy_(0.3 * torch.randn(32, generator=g))
    ids = random_ids(5, batch=1, seq=7)[0]
    ids[0] = 1
    graph = attribute(model, ids, progress=False)
    return graph, prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)


def test_graph_save_load(real_pruned, tmp_path):
    graph, _ = real_pruned
    graph.save(str(tmp_path / "g.pt"))
    back = Graph.load(str(tmp_path / "g.pt"))
    assert torch.equal(back.adjacency_matrix, graph.adjacency_matrix)
    assert torch.equal(back.active_features, graph.active_features)
    assert (back.mode, back.n_layers, back.settings) == (graph.mode, graph.n_layers, graph.settings)


def test_export_has_circuit_tracer_fields(real_pruned):
    graph, pruned = real_pruned
    data = to_circuit_tracer_json(pruned, CharTokenizer(), slug="g1", scan="tiny-adapters",
                                  clerps={(n.layer, n.index): "hello" for n in pruned.features()})
    assert set(data) >= {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert meta["slug"] == "g1" and meta["scan"] == "tiny-adapters" and meta["schema_version"] == 1
    assert meta["prompt_tokens"] == [CharTokenizer().decode([t]) for t in graph.input_ids.tolist()]
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    required = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"}
    ids = set()
    for node in data["nodes"]:
        assert required <= set(node)
        ids.add(node["node_id"])
        if node["feature_type"] == "cross layer transcoder":
            layer, idx, pos = map(int, node["node_id"].split("_"))
            assert node["feature"] == cantor_pair(layer, idx) and node["layer"] == str(layer)
            assert node["jsNodeId"] == f"{layer}_{idx}-0" and node["ctx_idx"] == pos and node["clerp"] == "hello"
            assert node["activation"] > 0 and 0 < node["influence"] <= 1
        elif node["feature_type"] == "embedding":
            assert node["node_id"] == f"E_{graph.input_ids[node['ctx_idx']]}_{node['ctx_idx']}"
        else:
            assert node["feature_type"] == "logit" and node["layer"] == str(graph.n_layers + 1)
            assert node["clerp"] == f'Output "{CharTokenizer().decode([node["feature"]])}" (p={node["token_prob"]:.3f})'
            assert node["jsNodeId"] == f"L_{node['feature']}-{graph.n_pos - 1}"
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == graph.n_pos
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert data["links"] and all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert any(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])


def test_round_trip(real_pruned):
    _, pruned = real_pruned
    data = to_circuit_tracer_json(pruned, CharTokenizer(), slug="g1", scan="tiny-adapters")
    back = from_circuit_tracer_json(json.loads(json.dumps(data)))
    assert back.nodes == pruned.nodes
    assert back.links == pruned.links
    assert back.input_ids == pruned.input_ids and back.n_layers == pruned.n_layers and back.mode == pruned.mode
    assert (back.node_threshold, back.edge_threshold) == (0.8, 0.98)
    again = to_circuit_tracer_json(back, CharTokenizer(), slug="g1", scan="tiny-adapters")
    for d in (data, again):
        d["metadata"].pop("info")
    assert again == data


def test_import_refuses_what_it_cannot_read():
    data = json.loads((Path(__file__).resolve().parents[1] / "data" / "circuit-tracer" / "ct-tiny-new-ids.json")
                      .read_text())
    bad = json.loads(json.dumps(data))
    bad["links"].append({"source": "nope", "target": bad["nodes"][-1]["node_id"], "weight": 1.0})
    with pytest.raises(GraphFormatError, match="nope"):
        from_circuit_tracer_json(bad)
    dup = json.loads(json.dumps(data))
    dup["nodes"].append(dict(dup["nodes"][0]))
    with pytest.raises(GraphFormatError, match="appears twice"):
        normalize_graph(dup)
    with pytest.raises(GraphFormatError, match="nodes"):
        normalize_graph({"metadata": data["metadata"]})
    inf = json.loads(json.dumps(data))
    inf["links"][0]["weight"] = float("inf")
    with pytest.raises(GraphFormatError, match="finite"):
        normalize_graph(inf)
    extra = json.loads(json.dumps(data))
    extra["metadata"]["unknown"] = 1
    del extra["qParams"]
    assert normalize_graph(extra).qParams.linkType == "both"  # Neuronpedia-style files without qParams read


def test_cantor_pairing_inverts():
    for layer, idx in [(0, 0), (3, 1234), (27, 8191), (40, 2**20)]:
        assert cantor_unpair(cantor_pair(layer, idx)) == (layer, idx)
