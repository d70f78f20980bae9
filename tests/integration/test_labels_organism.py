"""Labels on the tiny organism's finished demo run (``tiny_demo``: the demo pipeline through a real worker): the
collect job labelled every feature with the built-in rules, the run page shows the category analysis, the
hesitation study's output features are labelled as promoting hesitation words, and the ``label`` command relabels."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.db.session import make_engine
from app.web import create_app
from tests.label_checks import every_feature_has_a_builtin_label, study_output_features_promote_hesitation


def test_demo_run_is_labelled(tiny_demo) -> None:
    settings, run_id = tiny_demo["settings"], tiny_demo["run_id"]
    engine = make_engine(settings)
    try:
        counts = every_feature_has_a_builtin_label(engine, run_id)
        assert len(counts) >= 2, counts  # the rules tell kinds of features apart
        outputs = study_output_features_promote_hesitation(engine, run_id)
        client = TestClient(create_app(settings, engine=engine), base_url="http://127.0.0.1")
        cats = client.get(f"/api/runs/{run_id}").json()["categories"]
        assert cats["source"] == "builtin" and cats["n_labelled"] == sum(counts.values())
        assert cats["n_alive"] == sum(c["n"] for c in cats["overall"])
        print(f"categories {counts} ({cats['n_dead']} dead); alive: "
              f"{[(c['category'], c['n'], c['subcategories']) for c in cats['overall']]}; "
              f"reasoning share {cats['reasoning_share']}; study output features: {outputs}")
        some = client.get(f"/api/runs/{run_id}/features?q=fires&limit=5").json()["rows"]
        assert some and all("fires" in r["label"] for r in some)
    finally:
        engine.dispose()
