"""The graph viewer's data, new-graph requests, graph import and export round trips, feature JSON and JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, Graph, Job, JobStatus
from app.formats import (
    AblationTranscriptLine,
    ExperimentTranscriptLine,
    FeatureFile,
    GraphFile,
    cantor_pair,
)
from tests.seed import TOK

DATA = Path(__file__).resolve().parents[1] / "data" / "circuit-tracer"


def get(web, path: str, status: int = 200):
    resp = web.client.get(path)
    assert resp.status_code == status, resp.text[:500]
    return resp.json()


def test_view_is_columnar_and_pruned_on_the_server(web):
    base = f"/api{web.run}/graphs/{web.world.graph_id}/view"
    full = get(web, base)
    n = len(full["nodes"]["id"])
    assert n == full["n_nodes_total"] == 30 and full["n_not_sent"] == 0 and full["n_layers"] == 3
    assert all(len(col) == n for col in full["nodes"].values())
    assert len(full["links"]["source"]) == len(full["links"]["target"]) == len(full["links"]["weight"]) == \
        full["n_links_total"]
    assert full["features"]["2/7"]["role"] == "output" and full["features"]["2/7"]["frequency"] is not None
    cards = get(web, f"/api{web.run}/feature-cards?features=2/7,1/3")
    assert cards["2/7"]["top"][0] == " Wait" and cards["2/7"]["role"] == "output" and set(cards) == {"2/7", "1/3"}
    get(web, f"/api{web.run}/feature-cards?features=2:7", 422)
    cut = get(web, f"{base}?pruningThreshold=0.5")
    infl = dict(zip(full["nodes"]["id"], full["nodes"]["influence"], strict=True))
    kinds = dict(zip(full["nodes"]["id"], full["nodes"]["kind"], strict=True))
    expected = {i for i in infl if kinds[i] in (2, 3) or infl[i] <= 0.5}
    assert set(cut["nodes"]["id"]) == expected and cut["n_not_sent"] == n - len(expected) > 0
    sent = set(cut["nodes"]["id"])
    assert all(cut["nodes"]["id"][s] in sent and cut["nodes"]["id"][t] in sent
               for s, t in zip(cut["links"]["source"], cut["links"]["target"], strict=True))
    kept = get(web, f"{base}?pruningThreshold=0.5&keep=2_1_12")  # a pinned node survives the cut
    assert "2_1_12" in kept["nodes"]["id"] and "2_1_12" not in cut["nodes"]["id"]
    few = get(web, f"{base}?maxNodes=4")
    assert sum(k in (0, 1) for k in few["nodes"]["kind"]) == 4  # the four most influential features/errors
    assert min(i for i, k in zip(few["nodes"]["influence"], few["nodes"]["kind"], strict=True) if k in (0, 1)) == 0.25
    get(web, f"{base}?pruningThreshold=2", 422)
    get(web, f"/api{web.run}/graphs/999/view", 404)


def test_padded_vocabulary_ids_never_reach_top_lists(web):
    with Session(web.engine) as s, s.begin():
        f = s.get(Feature, (web.world.run_id, 2, 7))
        f.logit_lens = {"top": [[100_000, None, 9.0], [TOK[" Wait"], " Wait", 4.2]], "bottom": [[99_999, None, -3.0]]}
    card = get(web, f"/api{web.run}/feature-cards?features=2/7")["2/7"]
    assert card["top"] == [" Wait"] and card["bottom"] == []
    ff = get(web, f"/api{web.run}/features/2/7/circuit-tracer.json")
    assert ff["top_logits"] == [" Wait"] and ff["bottom_logits"] == []


def test_export_validates_and_round_trips_through_import(web):
    gid = web.world.graph_id
    first = get(web, f"/api{web.run}/graphs/{gid}/circuit-tracer.json")
    GraphFile.model_validate(first)
    resp = web.client.post(f"/api{web.run}/graphs/import?slug=round-trip", content=json.dumps(first))
    assert resp.status_code == 201, resp.text
    new_id = resp.json()["id"]
    again = get(web, f"/api{web.run}/graphs/{new_id}/circuit-tracer.json")
    assert again["metadata"].pop("slug") == "round-trip"
    first["metadata"].pop("slug")
    assert again == first
    # and the re-imported graph renders, with its prompt tokens and nodes
    page = web.client.get(resp.json()["url"])
    assert page.status_code == 200 and "round-trip" in page.text
    view = get(web, f"/api{web.run}/graphs/{new_id}/view")
    assert sorted(view["nodes"]["id"]) == sorted(n["node_id"] for n in first["nodes"])


def _documented_file() -> dict:
    """A graph file written from the fields formats.md documents (old error ids, no adapterlens keys)."""
    node = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": ""}
    nodes = [
        {**node, "node_id": "E_2_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
         "jsNodeId": "E_2-0"},
        {**node, "node_id": "E_9_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding",
         "jsNodeId": "E_9-1"},
        {**node, "node_id": "0_5_1", "feature": cantor_pair(0, 5), "layer": "0", "ctx_idx": 1,
         "feature_type": "cross layer transcoder", "jsNodeId": "0_5-0", "influence": 0.3, "activation": 2.5,
         "clerp": "says <hi>"},
        {**node, "node_id": "0_1_1", "feature": -1, "layer": "1", "ctx_idx": 1, "feature_type": "mlp reconstruction error",
         "jsNodeId": "1_1-0", "influence": 0.6},
        {**node, "node_id": "3_714_1", "feature": 714, "layer": "3", "ctx_idx": 1, "feature_type": "logit",
         "jsNodeId": "L_714-1", "clerp": 'Output " there" (p=0.412)', "token_prob": 0.412, "is_target_logit": True},
    ]
    links = [{"source": "E_9_1", "target": "0_5_1", "weight": 1.5}, {"source": "0_5_1", "target": "3_714_1", "weight": 0.7},
             {"source": "0_1_1", "target": "3_714_1", "weight": -0.2}]
    return {"metadata": {"slug": "gemma-hi", "scan": "gemmascope", "transcoder_list": [], "prompt_tokens": ["<bos>", "Hi"],
                         "prompt": "<bos>Hi", "node_threshold": 0.8, "schema_version": 1},
            "qParams": {"pinnedIds": ["0_1_1"], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def test_a_documented_circuit_tracer_file_imports_and_renders(web):
    resp = web.client.post(f"/api{web.run}/graphs/import", content=json.dumps(_documented_file()))
    assert resp.status_code == 201, resp.text
    gid = resp.json()["id"]
    data = get(web, f"/api{web.run}/graphs/{gid}")
    assert data["slug"] == "gemma-hi" and data["target_token"] == " there" and data["position"] == 1
    assert [p["text"] for p in data["prompt_tokens"]] == ["<bos>", "Hi"] and data["ablate"] is None
    kinds = {n["node_id"]: n["kind"] for n in data["nodes"]}
    assert kinds == {"E_2_0": "embedding", "E_9_1": "embedding", "0_5_1": "feature", "1_-1_1": "error",
                     "3_714_1": "logit"}  # the old error id, read by its type, in the current form
    view = get(web, f"/api{web.run}/graphs/{gid}/view")
    assert view["n_layers"] == 2 and len(view["links"]["source"]) == 3
    html = web.client.get(resp.json()["url"])
    assert html.status_code == 200
    assert "cannot be ablated here" in html.text
    exported = get(web, f"/api{web.run}/graphs/{gid}/circuit-tracer.json")
    assert exported["qParams"]["pinnedIds"] == ["1_-1_1"]
    assert {n["node_id"] for n in exported["nodes"]} == set(kinds)


def test_circuit_tracer_written_files_import(web):
    for name in ("ct-tiny-old-ids.json", "ct-tiny-new-ids.json"):
        resp = web.client.post(f"/api{web.run}/graphs/import", content=(DATA / name).read_bytes())
        assert resp.status_code == 201, resp.text
    with Session(web.engine) as s:
        rows = s.scalars(select(Graph).where(Graph.slug.in_(["ct-tiny-old-ids", "ct-tiny-new-ids"]))
                         .order_by(Graph.slug)).all()
        assert [sorted(n["node_id"] for n in g.nodes) for g in rows][0] == \
            [sorted(n["node_id"] for n in g.nodes) for g in rows][1]
        assert rows[0].params["prompt_token_ids"] == [1, 25, 5, 18, 24, 5]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"not json", 422, "not JSON"),
    (json.dumps({"metadata": {}, "nodes": [], "links": []}).encode(), 422, "metadata"),
    (json.dumps({**_documented_file(), "links": [{"source": "x", "target": "E_2_0", "weight": 1}]}).encode(), 422,
     "'x'"),
])
def test_bad_graph_files_are_refused_clearly(web, body, status, message):
    resp = web.client.post(f"/api{web.run}/graphs/import", content=body)
    assert resp.status_code == status and message in resp.json()["detail"]
    assert web.client.post("/api/runs/999/graphs/import", content=json.dumps(_documented_file())).status_code == 404


def test_new_graph_queues_an_interactive_attribute_job(web):
    resp = web.client.post(f"/api{web.run}/graphs", json={"prompt": "3 + 4", "target_token": " Wait",
                                                          "contrast_token": "auto", "mode": "frozen-mlp"})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    status = get(web, resp.json()["status_url"])
    assert status["status"] == "todo" and status["graph_url"] is None
    with Session(web.engine) as s, s.begin():
        job = s.get(Job, job_id)
        assert job.kind == "attribute" and job.priority == 100 and job.run_id == web.world.run_id
        assert job.payload.items() >= {"run_id": web.world.run_id, "prompt": "3 + 4", "chat": True,
                                       "target_token": " Wait", "contrast_token": "auto", "mode": "frozen-mlp",
                                       "max_feature_nodes": 10000, "node_threshold": 0.8}.items()
        job.status, job.result = JobStatus.SUCCEEDED, {"graph_id": web.world.graph_id, "message": "ok"}
    done = get(web, resp.json()["status_url"])
    assert done["graph_url"] == f"{web.run}/graphs/{web.world.graph_id}" and done["message"] == "ok"
    for body, code in [({"prompt": ""}, 422), ({"prompt": "x", "contrast_token": "auto"}, 422),
                       ({"prompt": "x", "mode": "exact"}, 422), ({"prompt": "x", "node_threshold": 3}, 422)]:
        bad = web.client.post(f"/api{web.run}/graphs", json=body)
        assert bad.status_code == code and bad.json()["detail"], body
    assert web.client.post("/api/runs/999/graphs", json={"prompt": "x"}).status_code == 404
    get(web, f"/api{web.run}/graph-jobs/{web.world.job_ids['train']}", 404)  # not an attribute job


def test_feature_file_and_transcripts(web):
    ff = get(web, f"/api{web.run}/features/1/3/circuit-tracer.json")
    f = FeatureFile.model_validate(ff)
    assert f.index == cantor_pair(1, 3) and f.examples_quantiles[0].quantile_name == "Top activations"
    top = f.examples_quantiles[0].examples[0]
    assert top.tokens[top.train_token_ind] == "<script>" and len(top.tokens) == len(top.tokens_acts_list)
    assert get(web, f"/api{web.run}/feature-files/{cantor_pair(1, 3)}.json") == ff
    get(web, f"/api{web.run}/features/0/999/circuit-tracer.json", 404)
    resp = web.client.get(f"/api{web.run}/ablations/{web.world.ablation_id}/transcript.jsonl")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/x-ndjson")
    lines = [AblationTranscriptLine.model_validate_json(line) for line in resp.text.splitlines()]
    assert [ln.condition for ln in lines] == ["unablated", "ablated"] and lines[0].features == [(1, 3), (2, 7)]
    assert lines[0].text.startswith("The sum is Wait")
    resp = web.client.get(f"/api{web.run}/experiments/{web.world.experiment_id}/transcript.jsonl")
    rows = [ExperimentTranscriptLine.model_validate_json(line) for line in resp.text.splitlines()]
    assert len(rows) == 16 and rows[2].prompt == "1 + 7 = ?"
    get(web, f"/api{web.run}/ablations/999/transcript.jsonl", 404)


def test_a_graph_without_features_says_why_on_its_page(web):
    with Session(web.engine) as s, s.begin():
        g = s.get(Graph, web.world.graph_id)
        g.scores = {**g.scores, "no_features": True, "feature_influence_share": 0.045,
                    "threshold_to_show_features": 0.9623}
    html = web.client.get(f"{web.run}/graphs/{web.world.graph_id}").text
    assert ("Pruning at node threshold 0.8 keeps no feature: features carry 4.5% of the influence on the logits; "
            "node threshold 0.9623 would show at least one") in html
    data = get(web, f"/api{web.run}/graphs/{web.world.graph_id}")
    assert data["no_feature_message"].startswith("Pruning at node threshold 0.8 keeps no feature")
