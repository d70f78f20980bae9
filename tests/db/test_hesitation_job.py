"""The ``attribute`` and ``hesitation`` jobs on the trained tiny run, through the store (SQLite and Postgres)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import Feature, FeatureSet, FeatureSetMember, Graph, Job, JobStatus, Prompt, Run
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from app.web.data.graphs import circuit_tracer_json
from worker.attribution import from_circuit_tracer_json
from worker.hesitation.roles import ROLES
from worker.loop import run_inline, run_worker

MODULES = ["worker.hesitation.job"]
LOOSE = {"node_threshold": 1.0, "edge_threshold": 1.0}  # the tiny run's features are weak: keep them all


@pytest.fixture
def settings(db_url: str, tiny_data_dir, tiny_run_settings: Settings) -> Settings:
    return Settings(data_dir=tiny_data_dir, database_url=db_url)


@pytest.fixture
def run_id(settings: Settings, tiny_run_settings: Settings) -> int:
    """The trained tiny run, registered in this test's database (same checkpoint), with one collected feature."""
    engine = make_engine(tiny_run_settings)
    with make_sessionmaker(engine)() as s:
        ckpt = s.get(Run, 1).checkpoint
    engine.dispose()
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s, s.begin():
        run = Run(name="tiny", base_model="organism:organism-tiny:s0", target_model="organism:organism-tiny:s0",
                  checkpoint=ckpt, status="trained", n_layers=2, n_features=64)
        s.add(run)
        s.flush()
        s.add(Feature(run_id=run.id, layer=0, index=1, logit_lens={"top": [[5, " Wait", 2.0]], "bottom": []}))
        s.add(Prompt(run_id=run.id, source="test", text="stored", token_ids=[1, 40, 41, 42, 43]))
        rid = run.id
    engine.dispose()
    return rid


def _session(settings: Settings) -> Session:
    return make_sessionmaker(make_engine(settings))()


def _count(settings: Settings, model, *where) -> int:
    with _session(settings) as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_attribute_stores_a_graph_that_round_trips(settings: Settings, run_id: int) -> None:
    payload = {"run_id": run_id, "prompt": "47 + 38 = ?", "chat": True, "target_token": " Wait", **LOOSE}
    out = run_inline(settings, "attribute", payload, show_progress=False, handler_modules=MODULES)
    with _session(settings) as s:
        g = s.get(Graph, out["graph_id"])
        assert g.slug == out["slug"] and g.slug.startswith("attr-")
        assert g.target_token_str == " Wait" and g.position == len(g.params["prompt_token_ids"]) - 1
        assert g.params["mode"] == "relp" and g.params["edge_threshold"] == 1.0
        assert g.scores["n_pruned_features"] > 0 and g.scores["target_prob"] > 0
        feats = [n for n in g.nodes if n["feature_type"] == "cross layer transcoder"]
        assert feats and all(n["activation"] > 0 and n["influence"] is not None for n in feats)
        labelled = [n for n in feats if n["node_id"].startswith("0_1_")]
        assert all(n["clerp"] == "↑' Wait'" for n in labelled)  # from the features table
        # the stored rows, as the dashboard serves them, read back as the same graph
        data = circuit_tracer_json(s, run_id, g.id)
        back = from_circuit_tracer_json(data)
        again = from_circuit_tracer_json({"metadata": g.params["metadata"], "nodes": g.nodes, "links": g.links})
    assert back.input_ids == g.params["prompt_token_ids"] == again.input_ids
    assert len(back.nodes) == len(g.nodes) and len(back.links) == len(g.links) == out["scores"]["n_links"]
    assert again.mode == "relp" and again.n_layers == 2
    target = [n for n in back.nodes if n.kind == "logit" and n.is_target_logit]
    assert [n.index for n in target] == [g.target_token_id]
    assert {(n.layer, n.index) for n in back.features()} == {(int(n["layer"]), int(n["node_id"].split("_")[1]))
                                                           for n in feats}


def test_attribute_rerun_replaces_the_graph(settings: Settings, run_id: int) -> None:
    base = {"run_id": run_id, "token_ids": [1, 40, 41, 42, 43, 44], "slug": "mine", **LOOSE}
    first = run_inline(settings, "attribute", base, show_progress=False, handler_modules=MODULES)
    second = run_inline(settings, "attribute", {**base, "mode": "frozen-mlp"}, show_progress=False,
                        handler_modules=MODULES)
    assert first["graph_id"] == second["graph_id"]
    with _session(settings) as s:
        assert s.get(Graph, first["graph_id"]).params["mode"] == "frozen-mlp"
    same = {"run_id": run_id, "prompt_id": _prompt_id(settings, run_id), **LOOSE}
    a = run_inline(settings, "attribute", same, show_progress=False, handler_modules=MODULES)
    b = run_inline(settings, "attribute", same, show_progress=False, handler_modules=MODULES)
    assert a["slug"] == b["slug"] and a["graph_id"] == b["graph_id"]  # the default slug follows the content
    with _session(settings) as s:
        assert s.get(Graph, a["graph_id"]).prompt_id == same["prompt_id"]
    assert _count(settings, Graph, Graph.run_id == run_id) == 2


def test_attribute_logit_difference_error_nodes_and_the_stored_prompt(settings: Settings, run_id: int) -> None:
    """frozen-mlp with " Wait" − (the best non-hesitation token): both are logit nodes, the graph keeps error
    nodes, and its exact token ids are a stored prompt (reused, not duplicated, by a re-run)."""
    payload = {"run_id": run_id, "prompt": "47 + 38 = ?", "chat": True, "target_token": " Wait",
               "contrast_token": "auto", "mode": "frozen-mlp", **LOOSE}
    out = run_inline(settings, "attribute", payload, show_progress=False, handler_modules=MODULES)
    assert out["contrast_token_id"] not in (None, out["target_token_id"]) and "Wait" not in out["contrast_token"]
    again = run_inline(settings, "attribute", payload, show_progress=False, handler_modules=MODULES)
    with _session(settings) as s:
        g = s.get(Graph, out["graph_id"])
        assert g.params["logit_diff"] == [out["target_token_id"], out["contrast_token_id"]]
        logits = {n["feature"] for n in g.nodes if n["feature_type"] == "logit"}
        assert {out["target_token_id"], out["contrast_token_id"]} <= logits
        assert any(n["feature_type"] == "mlp reconstruction error" and n["node_id"].split("_")[1] == "-1"
                   for n in g.nodes)
        assert g.scores["replacement"] is not None and 0 <= g.scores["completeness"] <= 1
        prompt = s.get(Prompt, g.prompt_id)
        assert prompt.token_ids == g.params["prompt_token_ids"] and prompt.source == "graph"
        assert s.get(Graph, again["graph_id"]).prompt_id == g.prompt_id
        assert s.scalar(select(func.count()).select_from(Prompt).where(Prompt.source == "graph")) == 1


def test_attribute_without_features_says_why(settings: Settings, run_id: int) -> None:
    payload = {"run_id": run_id, "token_ids": [1, 40, 41, 42, 43, 44], "mode": "frozen-mlp", "node_threshold": 0.05,
               "slug": "tight"}
    out = run_inline(settings, "attribute", payload, show_progress=False, handler_modules=MODULES)
    assert out["scores"]["n_pruned_features"] == 0 and out["scores"]["no_features"]
    show = out["scores"]["threshold_to_show_features"]
    assert "keeps no feature" in out["message"] and f"node threshold {show:g} would show" in out["message"]
    assert 0 < out["scores"]["feature_influence_share"] < 1
    wider = run_inline(settings, "attribute", {**payload, "node_threshold": show}, show_progress=False,
                       handler_modules=MODULES)
    assert wider["scores"]["n_pruned_features"] >= 1 and "message" not in wider


def _prompt_id(settings: Settings, run_id: int) -> int:
    with _session(settings) as s:
        return s.scalar(select(Prompt.id).where(Prompt.run_id == run_id))


@pytest.mark.parametrize(("change", "message"), [
    ({"run_id": 999}, "run 999 does not exist"),
    ({"prompt": "1 + 2 = ? " * 200}, "attribution takes at most 512"),
    ({"target_token": "Wait Wait Wait"}, "give one token or its id"),
    ({"target_token": 10**6}, "outside the vocabulary"),
    ({"prompt": None, "token_ids": [1, 10**6]}, "outside the vocabulary"),
    ({"prompt": None, "prompt_id": 12345}, "prompt 12345 does not exist"),
    ({"prompt_id": 1}, "exactly one of prompt, token_ids, prompt_id"),
    ({"mode": "exact"}, "mode"),
])
def test_attribute_bad_payloads_fail_clearly(settings: Settings, run_id: int, change: dict, message: str) -> None:
    payload = {"run_id": run_id, "prompt": "1 + 2 = ?", **change}
    with pytest.raises((ValueError, LookupError), match=message):
        run_inline(settings, "attribute", payload, show_progress=False, handler_modules=MODULES)
    assert _count(settings, Graph) == 0


def test_failed_attribute_job_says_why(settings: Settings, run_id: int) -> None:
    engine = make_engine(settings)
    job = queue.enqueue(engine, "attribute", {"run_id": run_id, "prompt": "7 " * 600}, max_attempts=1)
    engine.dispose()
    run_worker(settings, wait=False, handler_modules=MODULES, migrate=False)
    with _session(settings) as s:
        row = s.get(Job, job)
        assert row.status == JobStatus.FAILED and "attribution takes at most 512" in row.error


def test_hesitation_study_stores_graphs_and_a_set_idempotently(settings: Settings, run_id: int) -> None:
    """Reference traces (the tiny target never hesitates): sites, graphs, set; a re-run replaces everything."""
    other = run_inline(settings, "attribute", {"run_id": run_id, "prompt": "x", "slug": "keep-me"},
                       show_progress=False, handler_modules=MODULES)
    payload = {"run_id": run_id, "n_graphs": 3, "traces": "reference", **LOOSE, "max_new_tokens": 8,
               "max_feature_nodes": 300,
               "hesitation_words": ["Wait", "Hmm", "Actually"], "cap_fraction": 0.1}
    out = run_inline(settings, "hesitation", payload, show_progress=False, handler_modules=MODULES)
    assert out["sites"]["n_graphs"] == 3 and out["sites"]["n_sites"] >= 3
    assert len(out["sites"]["words"]) >= 2  # stratified over the words
    assert out["graphs"]["slugs"] == ["hesitation-000", "hesitation-001", "hesitation-002"]
    assert out["prompts"]["sites"] + out["prompts"]["validation"] + out["prompts"]["report"] <= 24
    assert out["features"]["n_recurring"] > 0
    size = out["set"]["size"]
    assert 1 <= size <= 0.1 * 128 and sum(out["set"]["roles"].values()) == size
    assert set(out["report"]) >= {"target", "adapted", "ablated", "removal"}
    with _session(settings) as s:
        graphs = s.scalars(select(Graph).where(Graph.run_id == run_id, Graph.slug.startswith("hesitation-"))).all()
        for g in graphs:
            assert g.params["study"]["word"] in ("Wait", "Hmm", "Actually")
            assert g.target_token_str.strip() == g.params["study"]["word"]
            assert g.nodes[-1]["feature_type"] == "logit"
            assert any(n.get("is_target_logit") for n in g.nodes)
        fs = s.scalar(select(FeatureSet).where(FeatureSet.run_id == run_id))
        assert fs.name == "hesitation features" and fs.description.startswith(f"{size} feature")
        members = s.scalars(select(FeatureSetMember).where(FeatureSetMember.set_id == fs.id)).all()
        assert len(members) == size and all(m.role in ROLES and m.score > 0 for m in members)
        first_set = fs.id

    again = run_inline(settings, "hesitation", {**payload, "n_graphs": 2}, show_progress=False,
                       handler_modules=MODULES)
    assert again["graphs"]["slugs"] == ["hesitation-000", "hesitation-001"]
    assert again["set"]["id"] == first_set
    assert _count(settings, Graph, Graph.run_id == run_id) == 3  # two study graphs and the user's graph
    assert _count(settings, Graph, Graph.id == other["graph_id"]) == 1
    assert _count(settings, FeatureSet) == 1
    assert _count(settings, FeatureSetMember) == again["set"]["size"]


def test_hesitation_study_bad_input(settings: Settings, run_id: int) -> None:
    with pytest.raises(LookupError, match="run 4242 does not exist"):
        run_inline(settings, "hesitation", {"run_id": 4242}, show_progress=False, handler_modules=MODULES)
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        run_inline(settings, "hesitation", {"run_id": run_id, "prompts_path": "/nonexistent.jsonl"},
                   show_progress=False, handler_modules=MODULES)
    with pytest.raises(ValueError, match="has no letters"):
        run_inline(settings, "hesitation", {"run_id": run_id, "hesitation_words": [",,"]},
                   show_progress=False, handler_modules=MODULES)
    with pytest.raises(ValueError, match="n_graphs"):
        run_inline(settings, "hesitation", {"run_id": run_id, "n_graphs": 0}, show_progress=False,
                   handler_modules=MODULES)
