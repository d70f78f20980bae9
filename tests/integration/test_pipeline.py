"""The default pipeline's handlers end to end on the tiny organism, on SQLite and Postgres."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from app.db.schema import Run, RunMetric
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from training.config import preset, train_config_to_dict
from worker.demo import ensure_run
from worker.loop import run_inline


@pytest.fixture
def settings(db_url: str, tiny_data_dir) -> Settings:
    return Settings(data_dir=tiny_data_dir, database_url=db_url)


def _new_run(settings: Settings, name: str, **train_overrides) -> int:
    cfg = train_config_to_dict(preset("organism-tiny")) | train_overrides
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s, s.begin():
        run_id = ensure_run(s, name=name, base_model="organism:organism-tiny:s0",
                            target_model="organism:organism-tiny:s0", config={"train": cfg, "data": {"kind": "organism"}})
    engine.dispose()
    return run_id


def test_train_then_evaluate_fills_the_run(settings: Settings, db_url: str) -> None:
    run_id = _new_run(settings, f"t-{abs(hash(db_url)) % 10**6}", max_steps=12)
    out = run_inline(settings, "train", {"run_id": run_id, "resume": False}, show_progress=False,
                     handler_modules=["worker.pipeline"])
    assert out["steps"] == 12
    ev = run_inline(settings, "evaluate", {"run_id": run_id, "n_prompts": 6, "max_new_tokens": 16},
                    show_progress=False, handler_modules=["worker.pipeline"])
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        run = s.get(Run, run_id)
        n_metrics = s.scalar(select(func.count()).select_from(RunMetric).where(RunMetric.run_id == run_id))
        steps = s.scalars(select(RunMetric.step).where(RunMetric.run_id == run_id).order_by(RunMetric.step)).all()
    engine.dispose()
    assert run.status == "evaluated" and run.checkpoint and run.n_layers == 2
    assert n_metrics == 12 and steps == list(range(1, 13))
    assert set(run.evaluation["models"]) == {"base", "hybrid", "adapted", "target"}
    assert run.evaluation["models"]["target"]["kl_to_target"] == pytest.approx(0.0, abs=1e-6)
    assert ev["kl_gap_closed"] == run.evaluation["kl_gap_closed"]
    saved = json.loads((settings.runs_dir / run.name / "eval.json").read_text())
    assert saved["n_prompts"] == 6


def test_collect_then_evaluate_leaves_the_run_collected(settings: Settings, db_url: str) -> None:
    """The pipelines collect before they evaluate (the feature pages come first): the evaluation that follows
    must not set a collected run back to "evaluated"."""
    run_id = _new_run(settings, f"c-{abs(hash(db_url)) % 10**6}", max_steps=4)
    run_inline(settings, "train", {"run_id": run_id, "resume": False}, show_progress=False,
               handler_modules=["worker.pipeline"])
    run_inline(settings, "collect", {"run_id": run_id, "n_prompts": 4, "max_new_tokens": 8, "top_k": 2,
                                     "n_random": 1}, show_progress=False, handler_modules=["worker.collect.job"])
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        assert s.get(Run, run_id).status == "collected"
    run_inline(settings, "evaluate", {"run_id": run_id, "n_prompts": 2, "max_new_tokens": 8},
               show_progress=False, handler_modules=["worker.pipeline"])
    with make_sessionmaker(engine)() as s:
        run = s.get(Run, run_id)
        assert run.status == "collected" and run.evaluation["models"]
    engine.dispose()


def test_retrain_is_idempotent(settings: Settings, db_url: str) -> None:
    """A re-run of a finished train job resumes at the end: no duplicated metric rows, same checkpoint."""
    run_id = _new_run(settings, f"r-{abs(hash(db_url)) % 10**6}", max_steps=4)
    first = run_inline(settings, "train", {"run_id": run_id, "resume": False}, show_progress=False,
                       handler_modules=["worker.pipeline"])
    again = run_inline(settings, "train", {"run_id": run_id}, show_progress=False, handler_modules=["worker.pipeline"])
    assert again["steps"] == first["steps"] == 4
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        n = s.scalar(select(func.count()).select_from(RunMetric).where(RunMetric.run_id == run_id))
    engine.dispose()
    assert n == 4


def test_unknown_run_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(LookupError, match="run 9999 does not exist"):
        run_inline(settings, "train", {"run_id": 9999}, show_progress=False, handler_modules=["worker.pipeline"])
