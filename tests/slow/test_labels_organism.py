"""Labels on the full organism's finished demo run (slow tier): every feature has a built-in label, and the
hesitation study's output features, in its set or recurring in its graphs (its roles, which the labeler
never reads) are labelled as promoting hesitation words; the run page reports the reasoning share. The tiny organism's study finds no output feature,
so this check lives here (tests/integration/test_labels_organism.py runs the rest on the tiny one)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.db.session import make_engine
from app.web import create_app
from tests.label_checks import every_feature_has_a_builtin_label, study_output_features_promote_hesitation

pytestmark = pytest.mark.slow


def test_study_output_features_are_labelled_as_promoting_hesitation(demo) -> None:
    engine = make_engine(demo["settings"])
    try:
        counts = every_feature_has_a_builtin_label(engine, demo["run_id"])
        outputs = study_output_features_promote_hesitation(engine, demo["run_id"])
        assert outputs, "the organism's study found no output feature"
        assert counts.get("reasoning", 0) >= len(outputs)
        client = TestClient(create_app(demo["settings"], engine=engine), base_url="http://127.0.0.1")
        cats = client.get(f"/api/runs/{demo['run_id']}").json()["categories"]
        assert cats["reasoning_share"] > 0 and cats["source"] == "builtin"
    finally:
        engine.dispose()
