"""Issue 2's acceptance on the full organism (tens of minutes on 2 cores: ``pytest -m slow``).

Adapters trained with the ``organism`` preset close ≥ 90% of the hybrid→target KL gap and reproduce
≥ 90% of the target's hesitation generations with ≤ 2% false ones, at an L0 well under 10% of the
width. ``ADAPTERLENS_ORGANISM_TEST_DIR`` reuses a data directory (its built organism and trained run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.db.migrate import upgrade
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from training.config import preset, train_config_to_dict
from worker.demo import ensure_run, organism_run_name, organism_spec
from worker.loop import run_inline

pytestmark = pytest.mark.slow

MODULES = ["worker.pipeline"]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> dict:
    data_dir = Path(os.environ.get("ADAPTERLENS_ORGANISM_TEST_DIR") or tmp_path_factory.mktemp("data"))
    settings = Settings(data_dir=data_dir)
    upgrade(settings.db_url)
    run_inline(settings, "organism", {"preset": "organism", "seed": 0}, show_progress=False, handler_modules=MODULES)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s, s.begin():
        spec = organism_spec("organism", 0)
        run_id = ensure_run(s, name=organism_run_name("organism", 0, "organism"), base_model=spec, target_model=spec,
                            config={"train": train_config_to_dict(preset("organism")), "data": {"kind": "organism"}})
    engine.dispose()
    run_inline(settings, "train", {"run_id": run_id}, show_progress=False, handler_modules=MODULES)
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
