"""Issue 2's acceptance on the full organism (tens of minutes on 2 cores: ``pytest -m slow``).

Adapters trained with the ``organism`` preset close ≥ 90% of the hybrid→target KL gap and reproduce
≥ 90% of the target's hesitation generations with ≤ 2% false ones, at an L0 well under 10% of the
width. ``ADAPTERLENS_ORGANISM_TEST_DIR`` reuses a data directory (its built organism and trained run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.db.session import make_engine, make_sessionmaker
from tests.organism_fixtures import trained_organism_run
from worker.loop import run_inline

pytestmark = pytest.mark.slow

MODULES = ["worker.pipeline"]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> dict:
    data_dir = Path(os.environ.get("ADAPTERLENS_ORGANISM_TEST_DIR") or tmp_path_factory.mktemp("data"))
    settings, run_id = trained_organism_run(data_dir, MODULES)
    run_inline(settings, "evaluate", {"run_id": run_id, "n_prompts": 300}, show_progress=False,
               handler_modules=MODULES)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        from app.db.schema import Run

        ev = s.get(Run, run_id).evaluation
    engine.dispose()
    return ev


def test_adapters_close_the_kl_gap(evaluation: dict) -> None:
    assert evaluation["kl_gap_closed"] >= 0.90, evaluation["kl_gap_closed"]


def test_adapters_reproduce_the_targets_hesitations(evaluation: dict) -> None:
    assert evaluation["reproduced_hesitation"] >= 0.90, evaluation["reproduced_hesitation"]
    assert evaluation["false_hesitation"] <= 0.02, evaluation["false_hesitation"]


def test_adapters_are_sparse(evaluation: dict) -> None:
    width = 512  # the organism preset's features per layer
    assert evaluation["l0_mean"] < 0.10 * width, evaluation["l0_per_layer"]
