"""The hesitation study's acceptance on the full organism (tens of minutes on a CPU: ``pytest -m slow``).

Builds the ``organism`` preset, trains its adapters with the ``organism`` training preset (both through the
job handlers), then runs the ``hesitation`` job with its defaults. Set ``ADAPTERLENS_ORGANISM_TEST_DIR`` to
a data directory to reuse what is already built and trained there (organism, checkpoint, SQLite store).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.schema import FeatureSet, FeatureSetMember
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from tests.organism_fixtures import trained_organism_run
from worker.loop import run_inline

pytestmark = pytest.mark.slow

MODULES = ["worker.pipeline", "worker.hesitation.job"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Settings, int, dict]:
    data_dir = Path(os.environ.get("ADAPTERLENS_ORGANISM_TEST_DIR") or tmp_path_factory.mktemp("data"))
    settings, run_id = trained_organism_run(data_dir, MODULES)
    out = run_inline(settings, "hesitation", {"run_id": run_id}, show_progress=False, handler_modules=MODULES)
    return settings, run_id, out


def test_a_few_percent_of_features_remove_most_hesitations(study):
    _, _, out = study
    report = out["report"]
    assert out["set"]["fraction"] <= 0.05, out["set"]
    assert report["adapted"]["hesitation_rate"] >= 0.2, report["adapted"]  # there is something to remove
    assert report["removal"] >= 0.8, report
    assert abs(report["ablated"]["accuracy"] - report["adapted"]["accuracy"]) <= 0.05, report
    assert report["ablated"]["mean_length"] < report["adapted"]["mean_length"]  # shorter responses
    assert report["control"]["removal"] < 0.5 * report["removal"], report["control"]  # not any set of that size


def test_both_roles_are_present(study):
    settings, run_id, out = study
    roles = out["set"]["roles"]
    assert roles["output"] >= 1 and roles["template"] >= 1, out["set"]
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        fs = s.scalar(select(FeatureSet).where(FeatureSet.run_id == run_id, FeatureSet.name == "hesitation features"))
        members = s.scalars(select(FeatureSetMember).where(FeatureSetMember.set_id == fs.id)).all()
    engine.dispose()
    assert len(members) == out["set"]["size"]
    assert {m.role for m in members} >= {"output", "template"}
