"""A tiny built organism and a trained run, shared by the tests that need real (small) models.

Built once per test session into a temporary data directory with the ``organism-tiny`` presets
(seconds), through the same job handlers the CLI and the worker use.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.db.migrate import upgrade
from app.settings import Settings


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the built ``organism-tiny`` (seed 0)."""
    from training.organism.build import build_organism

    data_dir = tmp_path_factory.mktemp("data")
    build_organism("organism-tiny", 0, data_dir=data_dir, progress=False)
    return data_dir


@pytest.fixture(scope="session")
def tiny_run_settings(tiny_data_dir: Path) -> Settings:
    """Settings of a SQLite store (in the data directory) holding one trained tiny run (id 1)."""
    from app.db.session import make_engine, make_sessionmaker
    from training.config import preset, train_config_to_dict
    from worker.demo import ensure_run
    from worker.loop import run_inline

    settings = Settings(data_dir=tiny_data_dir)
    upgrade(settings.db_url)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s, s.begin():
        run_id = ensure_run(s, name="tiny", base_model="organism:organism-tiny:s0",
                            target_model="organism:organism-tiny:s0",
                            config={"train": train_config_to_dict(preset("organism-tiny")), "data": {"kind": "organism"}})
    engine.dispose()
    run_inline(settings, "train", {"run_id": run_id}, show_progress=False, handler_modules=["worker.pipeline"])
    return settings


def collect_tiny_run(db_url: str, tiny_run_settings: Settings, handler_modules: list[str]) -> tuple[Settings, int]:
    """The tiny trained run copied into ``db_url``'s store (same models and checkpoint) and collected there
    by the collect job (small: 24 prompts). Returns the store's settings and the new run's id."""
    from sqlalchemy.orm import Session

    from app.db.schema import Run
    from app.db.session import make_engine
    from worker.loop import run_inline

    upgrade(db_url)
    settings = tiny_run_settings.model_copy(update={"database_url": db_url})
    src = make_engine(tiny_run_settings)
    with Session(src) as s:
        run = s.get(Run, 1)
        values = {c: getattr(run, c) for c in ("name", "base_model", "target_model", "config", "n_layers",
                                              "n_features", "d_model", "checkpoint")}
    src.dispose()
    dst = make_engine(settings)
    with Session(dst) as s, s.begin():
        row = Run(**values, status="trained")
        s.add(row)
        s.flush()
        run_id = row.id
    dst.dispose()
    run_inline(settings, "collect", {"run_id": run_id, "n_prompts": 24, "max_new_tokens": 24, "top_k": 5,
                                     "n_random": 2}, show_progress=False, handler_modules=handler_modules)
    return settings, run_id


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished demo run of the tiny organism, as ``adapterlens up`` leaves it: the demo pipeline (organism,
    train, collect, evaluate, hesitation study) run by a worker from the queue, then an ablation (free text),
    an ablation on a stored example, an experiment and an attribution graph requested as a user would.

    Returns ``{"settings", "run_id", "ablation_ids", "experiment_id"}`` (the store is SQLite in the data dir).
    """
    from fastapi.testclient import TestClient

    from app.db import queue
    from app.db.schema import Example
    from app.db.session import make_engine
    from app.web import create_app
    from worker.bootstrap import bootstrap
    from worker.loop import run_worker

    settings = Settings(data_dir=tmp_path_factory.mktemp("tiny-demo"))
    upgrade(settings.db_url)
    engine = make_engine(settings)
    try:
        bootstrap(engine, organism_preset="organism-tiny", train_preset="organism-tiny", seed=0)
        run_worker(settings, wait=False, migrate=False)
        client = TestClient(create_app(settings, engine=engine), base_url="http://127.0.0.1")
        run_id = client.get("/api/runs").json()["latest"]["id"]
        feature = client.get(f"/api/runs/{run_id}/features?limit=1&sort=frequency").json()["rows"][0]
        fl = f"{feature['layer']}:{feature['index']}"
        ablations = [client.post(f"/api/runs/{run_id}/ablations",
                                 json={"features": fl, "prompt": "12 + 34 = ?", "max_new_tokens": 8}).json()["id"]]
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        with Session(engine) as s:
            example_id = s.scalar(select(Example.id).where(Example.run_id == run_id, Example.kind == "top").limit(1))
        ablations.append(client.post(f"/api/runs/{run_id}/ablations", json={
            "features": fl, "source": "example", "example_id": example_id, "max_new_tokens": 8}).json()["id"])
        experiment_id = client.post(f"/api/runs/{run_id}/experiments",
                                    json={"features": fl, "n_prompts": 4, "max_new_tokens": 8}).json()["id"]
        with Session(engine) as s, s.begin():
            queue.enqueue(s, "attribute", {"run_id": run_id, "prompt": "12 + 34 = ?", "chat": True,
                                           "max_feature_nodes": 50}, priority=100, run_id=run_id)
        run_worker(settings, wait=False, migrate=False)
    finally:
        engine.dispose()
    return {"settings": settings, "run_id": run_id, "ablation_ids": ablations, "experiment_id": experiment_id}
