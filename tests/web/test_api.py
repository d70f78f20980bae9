"""The JSON twins: same context as the pages, keyset pagination, the circuit-tracer download, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.seed import N_FEATURES, N_LAYERS


def get(web, path: str, status: int = 200) -> dict:
    resp = web.client.get(path)
    assert resp.status_code == status, resp.text[:500]
    return resp.json()


def test_run_json(web):
    data = get(web, f"/api{web.run}")
    assert data["run"]["name"] == "demo"
    assert data["evaluation"]["kl_gap_closed"] == pytest.approx(1 - 0.09 / 0.42)
    assert [m["name"] for m in data["evaluation"]["models"]] == ["base", "hybrid", "adapted", "target"]
    assert data["curves"]["steps"][:3] == [0, 5, 10]
    assert {"loss", "nmse[0]", "nmse[2]", "lr"} <= set(data["curves"]["series"])
    assert data["n_collected"] == N_LAYERS * N_FEATURES
    assert get(web, "/api/")["latest"]["id"] == web.world.run_id


@pytest.mark.parametrize("sort", ["layer", "frequency", "max_act"])
def test_keyset_pages_cover_every_feature_once_in_order(web, sort):
    seen, after, pages = [], None, 0
    while True:
        params = {"sort": sort, "limit": 7} | ({"after": after} if after else {})
        data = web.client.get(f"/api{web.run}/features", params=params).json()
        seen += data["rows"]
        pages += 1
        after = data["next"]
        if after is None:
            break
    assert pages == -(-N_LAYERS * N_FEATURES // 7)
    keys = [(r["layer"], r["index"]) for r in seen]
    assert len(set(keys)) == len(keys) == N_LAYERS * N_FEATURES
    if sort == "layer":
        assert keys == sorted(keys)
    else:
        values = [(r[sort], r["layer"], r["index"]) for r in seen]
        assert values == sorted(values, reverse=True)


def test_feature_filters(web):
    url = f"/api{web.run}/features"
    rows = get(web, f"{url}?category=digits&layer=2")["rows"]
    assert rows and all(r["category"] == "digits" and r["layer"] == 2 for r in rows)
    rows = get(web, f"{url}?freq_min=0.01&freq_max=0.05")["rows"]
    assert rows and all(0.01 <= r["frequency"] <= 0.05 for r in rows)
    rows = get(web, f"{url}?in_set=true")["rows"]
    assert {(r["layer"], r["index"], r["role"]) for r in rows} == {
        (0, 2, "template"), (1, 3, "output"), (1, 5, "template"), (2, 7, "output"), (2, 9, "output")}
    data = get(web, f"{url}?promotes=Wait")
    assert len(data["search_ids"]["promotes"]) == 3 and data["sort"] == "strength"  # " Wait", "Wait", " wait"
    assert (data["rows"][0]["layer"], data["rows"][0]["index"]) == (2, 7)  # its logit lens puts " Wait" first, 4.2
    strengths = [r["strength"] for r in data["rows"]]
    assert strengths == sorted(strengths, reverse=True)
    script = get(web, f"{url}?fires_on=<script>")["rows"]
    assert (1, 3) in {(r["layer"], r["index"]) for r in script}  # the focus token of its top example
    for r in get(web, f"{url}?promotes=<script>")["rows"]:  # each promotes it: in its logit-lens top 10
        lens = get(web, f"/api{web.run}/features/{r['layer']}/{r['index']}")["logit_top"]
        assert "<script>" in [t["text"] for t in lens[:10]]
    both = get(web, f"{url}?promotes=Wait&fires_on=<script>&sort=layer")["rows"]
    assert {(r["layer"], r["index"]) for r in both} <= {(r["layer"], r["index"]) for r in script}
    assert get(web, f"{url}?promotes=zzzz-not-a-token")["rows"] == []
    assert web.client.get(f"{url}?sort=strength").status_code == 422  # strength needs a token filter


def test_feature_json(web):
    layer, index = web.world.script_feature
    data = get(web, f"/api{web.run}/features/{layer}/{index}")
    top = data["examples"]["top"]
    assert len(top) == 5 and [e["rank"] for e in top] == list(range(5))
    first = top[0]
    assert first["tokens"][first["focus"]] == "<script>" and first["tokens"][first["focus"] + 1] == '"'
    assert first["acts"][first["focus"]] == pytest.approx(first["max_act"])
    assert len(first["tokens"]) == len(first["token_ids"]) == len(first["acts"]) == 30
    assert data["sets"] == [{"id": web.world.set_id, "name": "hesitation", "role": "output", "score": data["sets"][0]["score"]}]
    assert data["graphs"][0]["positions"] == [13, 14]
    assert len(data["logit_top"]) == 10 and data["histogram"]["counts"]
    assert data["vocab_source"].endswith("tokenizer.json")


def test_logit_lens_without_text_is_decoded(web):
    from tests.seed import VOCAB

    data = get(web, f"/api{web.run}/features/0/0")
    assert all(t["text"] == VOCAB[t["id"]] for t in data["logit_top"])
    rows = get(web, f"/api{web.run}/features?layer=0&limit=1")["rows"]
    assert rows[0]["top_token"] == data["logit_top"][0]["text"]


def test_graph_json_and_circuit_tracer_download(web):
    gid = web.world.graph_id
    data = get(web, f"/api{web.run}/graphs/{gid}")
    assert sum(n["kind"] == "feature" for n in data["nodes"]) == 10
    assert sum(n["kind"] == "error" for n in data["nodes"]) == 3
    assert data["prompt_tokens"][data["position"]]["text"] == "\n\n"
    assert data["mode"] == "frozen-mlp" and "error nodes" in data["non_feature_nodes"].lower()
    assert data["scores"]["replacement"] == 0.61 and data["logit_diff"] == [" Wait", "7"]
    resp = web.client.get(f"/api{web.run}/graphs/{gid}/circuit-tracer.json")
    assert resp.headers["content-disposition"] == 'attachment; filename="demo-wait-0.json"'
    ct = resp.json()
    assert set(ct) == {"metadata", "qParams", "nodes", "links"}
    meta = ct["metadata"]
    assert meta["slug"] == "demo-wait-0" and meta["schema_version"] == 1 and meta["node_threshold"] == 0.8
    assert len(meta["prompt_tokens"]) == 15 and meta["prompt_tokens"][0] == "<｜begin▁of▁sentence｜>"
    assert {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"} <= set(ct["qParams"])
    node = next(n for n in ct["nodes"] if n["feature_type"] == "cross layer transcoder")
    assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence", "activation"} <= set(node)
    ids = {n["node_id"] for n in ct["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in ct["links"])


def test_ablation_experiment_jobs_json(web):
    data = get(web, f"/api{web.run}/ablations/{web.world.ablation_id}")
    assert data["divergence"] == 3 and data["done"] is True
    assert [c["name"] for c in data["conditions"]] == ["unablated", "ablated"]
    assert data["conditions"][0]["n_hesitations"] == 1
    assert data["ablation"]["request"]["features"] == [[1, 3], [2, 7]]
    exp = get(web, f"/api{web.run}/experiments/{web.world.experiment_id}")
    assert [c["name"] for c in exp["conditions"]] == ["baseline", "ablated"] and len(exp["rows"]) == 8
    jobs = get(web, "/api/jobs")
    assert jobs["counts"] == {"succeeded": 2, "running": 1, "failed": 1, "todo": 1}
    assert jobs["running"][0]["percent"] == 25.0


ERROR_CASES = [
    ("/api/runs/nope", 404), ("/api/runs/999", 404), ("/api/runs/{run}/features/0/999", 404),
    ("/api/runs/{run}/features/x/1", 422), ("/api/runs/{run}/features/-1/1", 422), ("/api/runs/{run}/graphs/999", 404),
    ("/api/runs/{run}/graphs/0", 422), ("/api/runs/{run}/ablations/999", 404), ("/api/runs/{run}/experiments/999", 404),
    ("/api/runs/{run}/features?limit=0", 422), ("/api/runs/{run}/features?limit=abc", 422),
    ("/api/runs/{run}/features?freq_min=0.5&freq_max=0.1", 422), ("/api/runs/{run}/features?sort=bogus", 422),
    ("/api/runs/{run}/features?sort=frequency&after=1:2", 400), ("/api/runs/{run}/features?after=a:b", 400),
    ("/api/nothing-here", 404), ("/runs/{run}/features/0/999", 404), ("/runs/{run}/features?limit=-5", 422),
    ("/runs/{run}/graphs/abc", 422), ("/runs/nope/ablations", 404),
]


def test_errors_are_clear_and_never_500(web):
    for path, status in ERROR_CASES:
        resp = web.client.get(path.format(run=web.world.run_id))
        assert resp.status_code == status, path
        if path.startswith("/api/"):
            assert resp.json()["detail"], path
        else:
            assert "error-message" in resp.text, path


def test_unmigrated_database_is_a_clear_503(tmp_path):
    from fastapi.testclient import TestClient

    from app.settings import Settings
    from app.web import create_app

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'blank.db'}", data_dir=tmp_path))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        resp = client.get("/api/jobs")
        assert resp.status_code == 503 and "adapterlens db upgrade" in resp.json()["detail"]
        assert client.get("/jobs").status_code == 503


def test_openapi_lists_every_json_twin(web):
    paths = set(web.client.get("/openapi.json").json()["paths"])
    assert {"/api/runs/{run}", "/api/runs/{run}/features", "/api/runs/{run}/features/{layer}/{index}",
            "/api/runs/{run}/graphs/{graph_id}", "/api/runs/{run}/graphs/{graph_id}/circuit-tracer.json",
            "/api/runs/{run}/ablations", "/api/runs/{run}/ablations/{ablation_id}",
            "/api/runs/{run}/experiments/{experiment_id}", "/api/jobs", "/api/jobs/{job_id}/retry"} <= paths
    assert all(p.startswith("/api/") for p in paths)


def test_web_app_never_imports_torch(tmp_path):
    code = (
        "import sys\nfrom app.settings import Settings\nfrom app.web import create_app\n"
        "from app.db.migrate import upgrade\n"
        f"settings = Settings(data_dir={str(tmp_path)!r})\nupgrade(settings.db_url)\n"
        "app = create_app(settings)\n"
        "from fastapi.testclient import TestClient\n"
        "TestClient(app, base_url='http://127.0.0.1').get('/jobs')\n"
        "import app.web.data.ablations, app.db.requests, app.db.queue\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_feature_page_bands_shares_and_token_kinds(web):
    layer, index = web.world.script_feature
    data = get(web, f"/api{web.run}/features/{layer}/{index}")
    assert [b["band"] for b in data["bands"]] == [7, 4]  # highest band first
    for b in data["bands"]:
        ex = b["examples"][0]
        assert b["low"] <= ex["acts"][ex["focus"]] < b["high"]
        assert b["share"] is None or 0 <= b["share"] <= 1
    assert "quantile" not in data["examples"]
    assert sum(data["region_shares"].values()) == pytest.approx(1)
    from training.hesitation import hesitation_marks

    marked = 0
    for ex in data["examples"]["top"] + data["examples"]["random"]:  # the run's words in the decoded text
        assert ex["hesitation"] == hesitation_marks(ex["tokens"])
        assert len(ex["token_kinds"]) == len(ex["tokens"])
        marked += sum(ex["hesitation"])
    assert marked > 0
    html = web.client.get(f"{web.run}/features/{layer}/{index}").text
    assert 'data-band="7"' in html and "of activations" in html and "data-next=" in html


def test_a_large_runs_collected_count_is_its_collected_layers(web):
    """Past 10,000 features the overview counts the layers present (each written whole) times their width, by a
    loose index scan, instead of counting index entries; a layer not yet collected is not counted."""
    from sqlalchemy.orm import Session

    from app.db.schema import Feature, Run

    with Session(web.engine) as s, s.begin():
        run = Run(name="large", base_model="b", target_model="t", n_layers=4, n_features=5000, config={})
        s.add(run)
        s.flush()
        for layer in (0, 2):  # two of four layers stored, a few rows each (only their presence counts)
            s.add_all(Feature(run_id=run.id, layer=layer, index=i, frequency=0.0) for i in range(3))
        rid = run.id
    assert get(web, f"/api/runs/{rid}")["n_collected"] == 2 * 5000
