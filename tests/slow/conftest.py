"""The slow tier's one finished demo run on the full organism, shared by every slow test.

``demo`` is what the README's main job leaves behind: the demo pipeline (organism build → train → evaluate →
collect → hesitation study) queued by ``bootstrap`` and run by a worker, exactly as ``adapterlens up`` does,
on SQLite in a data directory. Building it takes tens of minutes on 2 cores, so it is built once per session;
``ADAPTERLENS_ORGANISM_TEST_DIR`` points at a data directory to reuse (an earlier ``adapterlens up`` or
``adapterlens pipeline`` there, or an earlier slow run): whatever the store already holds is kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.migrate import upgrade
from app.db.schema import FeatureSet, Run
from app.db.session import make_engine
from app.settings import Settings

ORGANISM_DIR_ENV = "ADAPTERLENS_ORGANISM_TEST_DIR"


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``{"settings", "run_id", "evaluation", "study", "precision"}`` of the finished demo run (see the module docstring)."""
    from training.organism.build import organism_paths
    from worker.bootstrap import bootstrap
    from worker.loop import run_worker

    data_dir = Path(os.environ.get(ORGANISM_DIR_ENV) or tmp_path_factory.mktemp("demo"))
    settings = Settings(data_dir=data_dir)
    upgrade(settings.db_url)
    engine = make_engine(settings)
    try:
        bootstrap(engine, organism_preset="organism", train_preset="organism", seed=0)
        run_worker(settings, wait=False, migrate=False)
        with Session(engine) as s:
            run = s.scalars(select(Run).order_by(Run.id)).first()
            assert run is not None, "the demo pipeline made no run"
            study = s.scalars(select(FeatureSet).where(FeatureSet.run_id == run.id,
                                                       FeatureSet.name.ilike("%hesitation%"))).first()
            manifest = organism_paths(data_dir, "organism", 0).read_manifest()
            return {"settings": settings, "run_id": run.id, "evaluation": run.evaluation,
                    "study": study.summary if study is not None else None,
                    "precision": manifest.get("precision", "fp32")}  # the organism build's (README: bf16 on the CPU)
    finally:
        engine.dispose()


# Chromium and its page fixture, for the slow tier's browser tests on the demo run.
from tests.browser.conftest import chromium, page  # noqa: E402,F401  (fixtures re-exported to this folder)
