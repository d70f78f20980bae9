"""Our pruning and export against graph files that circuit-tracer's own writer produced (tests/data/circuit-tracer).

The input is one unpruned frozen-mlp graph (with error nodes); the files are what circuit-tracer's
``create_graph_files`` wrote for it, in the old and the new error-id form (see the data's README). Our
:func:`prune_graph` + :func:`to_circuit_tracer_json` must give the same nodes (ids, kinds, cumulative
influence, activations), the same links and weights; both files must import as the same graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.formats import GraphFile, normalize_graph
from worker.attribution.export import from_circuit_tracer_json, to_circuit_tracer_json
from worker.attribution.graph import Graph, prune_graph

DATA = Path(__file__).resolve().parents[1] / "data" / "circuit-tracer"
NODE_T, EDGE_T = 0.98, 0.98  # what the files were written with


class WordTokenizer:
    """The files' tokenizer: id i is the word ``t{i}``."""

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def graph() -> Graph:
    d = json.loads((DATA / "tiny-frozen-mlp-graph.json").read_text())
    n = d["n_nodes"]
    adj = torch.zeros(n, n, dtype=torch.float32)
    for t, s, w in d["adjacency_entries"]:
        adj[t, s] = w
    zeros = torch.zeros(n, dtype=torch.float64)
    return Graph(input_ids=torch.tensor(d["input_tokens"]), active_features=torch.tensor(d["active_features"]),
                 activation_values=torch.tensor(d["activation_values"], dtype=torch.float32).double(),
                 selected_features=torch.tensor(d["selected_features"]), adjacency_matrix=adj.double(),
                 logit_tokens=torch.tensor(d["logit_tokens"]),
                 logit_probabilities=torch.tensor(d["logit_probabilities"], dtype=torch.float32).double(),
                 target_values=zeros, constant_contributions=zeros, dropped_contributions=zeros, mode=d["mode"],
                 n_layers=d["n_layers"], n_features_per_layer=d["n_features_per_layer"],
                 n_error_nodes=d["n_error_nodes"])


def _file(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_pruning_and_export_match_circuit_tracer_node_for_node(graph):
    theirs = _file("ct-tiny-new-ids.json")
    ours = to_circuit_tracer_json(prune_graph(graph, NODE_T, EDGE_T), WordTokenizer(), slug="ct-tiny-new-ids",
                                  scan="tiny-adapters", prompt=theirs["metadata"]["prompt"])
    kinds = {n["feature_type"] for n in theirs["nodes"]}
    assert {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"} <= kinds  # a real test
    by_id = {n["node_id"]: n for n in ours["nodes"]}
    assert set(by_id) == {n["node_id"] for n in theirs["nodes"]}
    for t in theirs["nodes"]:
        o = by_id[t["node_id"]]
        for key in ("feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "is_target_logit", "clerp"):
            assert o[key] == t[key], (t["node_id"], key)
        for key in ("influence", "activation", "token_prob"):
            if t.get(key) is None:
                assert o.get(key) is None, (t["node_id"], key)
            else:
                assert o[key] == pytest.approx(t[key], rel=1e-5, abs=1e-7), (t["node_id"], key)
    mine = {(e["source"], e["target"]): e["weight"] for e in ours["links"]}
    assert set(mine) == {(e["source"], e["target"]) for e in theirs["links"]}
    for e in theirs["links"]:
        assert mine[(e["source"], e["target"])] == pytest.approx(e["weight"], rel=1e-6)
    for key in ("slug", "scan", "prompt_tokens", "prompt", "node_threshold", "schema_version", "transcoder_list"):
        assert ours["metadata"][key] == theirs["metadata"][key], key
    assert ours["qParams"] == theirs["qParams"]


def test_both_error_id_forms_import_as_the_same_graph():
    old, new = _file("ct-tiny-old-ids.json"), _file("ct-tiny-new-ids.json")
    assert any(n["node_id"].startswith("0_0_") and n["feature_type"] == "mlp reconstruction error"
               for n in old["nodes"])  # the old form, as circuit-tracer wrote it
    a, b = normalize_graph(old), normalize_graph(new)
    assert [n.model_dump() for n in a.nodes] == [n.model_dump() for n in b.nodes]
    assert [e.model_dump() for e in a.links] == [e.model_dump() for e in b.links]
    # the old jsNodeIds collide (error 0_0_3 and feature 0_3_5 both "0_3-0"); the imported ones do not
    old_js = [n["jsNodeId"] for n in old["nodes"]]
    assert len(set(old_js)) < len(old_js)
    assert len({n.jsNodeId for n in a.nodes}) == len(a.nodes)
    ga, gb = from_circuit_tracer_json(old), from_circuit_tracer_json(new)
    assert ga.nodes == gb.nodes and ga.links == gb.links
    errors = [n for n in ga.nodes if n.kind == "error"]
    assert {(n.layer, n.pos) for n in errors} == {(int(n["layer"]), n["ctx_idx"]) for n in new["nodes"]
                                                   if n["feature_type"] == "mlp reconstruction error"}


def test_our_export_validates_as_circuit_tracer_requires(graph):
    data = to_circuit_tracer_json(prune_graph(graph, NODE_T, EDGE_T), WordTokenizer(), slug="g", scan="s")
    f = GraphFile.model_validate(data)
    required = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"}
    assert all(required <= set(n) for n in data["nodes"])
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt"} <= set(data["metadata"])
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    assert len({n.jsNodeId for n in f.nodes}) == len(f.nodes)
