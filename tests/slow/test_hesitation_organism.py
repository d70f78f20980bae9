"""The hesitation study's acceptance on the full organism (tens of minutes on a CPU: ``pytest -m slow``).

The study is the one the slow tier's demo run made (tests/slow/conftest.py): the ``hesitation`` job with its
defaults after the ``organism`` build and training presets.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.db.schema import FeatureSet, FeatureSetMember
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(demo) -> tuple[Settings, int, dict]:
    """The demo run's hesitation study (its job's defaults), as stored with its feature set."""
    assert demo["study"] is not None, "the demo run has no hesitation set with a study"
    return demo["settings"], demo["run_id"], demo["study"]


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
    """The paper's two kinds among the features that recur in the hesitation graphs (a node of ≥ 25% of them):
    output features (lens puts a hesitation word first, influence through the direct edge) and template
    features (influence from formatting positions). Which of them the greedy set picks varies with the machine
    and the training seed (README: the spread), so the set is asked only to hold role features."""
    settings, run_id, out = study
    recurring = out["features"]["roles_recurring"]
    assert recurring["output"] >= 1 and recurring["template"] >= 1, out["features"]
    roles = out["set"]["roles"]
    assert roles["output"] + roles["template"] >= 1, out["set"]
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        fs = s.scalar(select(FeatureSet).where(FeatureSet.run_id == run_id, FeatureSet.name == "hesitation features"))
        members = s.scalars(select(FeatureSetMember).where(FeatureSetMember.set_id == fs.id)).all()
    engine.dispose()
    assert len(members) == out["set"]["size"]
    assert {m.role for m in members} & {"output", "template"}
    assert sum(m.role == "output" for m in members) == roles["output"]
