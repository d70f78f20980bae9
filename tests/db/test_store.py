"""The schema's behaviour on both backends, and the idempotent-write helpers handlers rely on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import write
from app.db.schema import Example, Feature, Graph, Job, Run, RunMetric
from app.db.session import make_engine, make_sessionmaker, session_scope
from app.db.write import replace_rows, upsert


def _run(session: Session, name: str = "run") -> int:
    run = Run(name=name, base_model="base", target_model="target", config={"lr": 1e-3})
    session.add(run)
    session.flush()
    return run.id


def test_timestamps_are_aware_utc_and_json_none_is_null(db_engine: Engine) -> None:
    with Session(db_engine) as session, session.begin():
        run_id = _run(session)
        when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
        session.add(Job(kind="k", run_after=when, progress=None))
    with Session(db_engine) as session:
        run = session.get(Run, run_id)
        assert run.created.tzinfo is not None and abs(datetime.now(UTC) - run.created) < timedelta(minutes=5)
        job = session.scalars(select(Job)).one()
        assert job.run_after == when and job.run_after.utcoffset() == timedelta(0)
        assert session.scalar(select(func.count()).select_from(Job).where(Job.progress.is_(None))) == 1
        assert run.config == {"lr": 1e-3}


def test_deleting_a_run_cascades(db_engine: Engine) -> None:
    with Session(db_engine) as session, session.begin():
        run_id = _run(session)
        session.add(Feature(run_id=run_id, layer=0, index=7, frequency=0.1, max_act=2.0, mean_act=0.5))
        session.add(RunMetric(run_id=run_id, step=0, metrics={"loss": 1.0}))
    with Session(db_engine) as session, session.begin():
        session.delete(session.get(Run, run_id))
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(Feature)) == 0
        assert session.scalar(select(func.count()).select_from(RunMetric)) == 0


def test_unique_constraints(db_engine: Engine) -> None:
    with Session(db_engine) as session, session.begin():
        _run(session, "same")
    with pytest.raises(IntegrityError), Session(db_engine) as session, session.begin():
        _run(session, "same")


def test_upsert_inserts_then_replaces(db_engine: Engine) -> None:
    with Session(db_engine) as session, session.begin():
        run_id = _run(session)
    rows = [
        {"run_id": run_id, "layer": 1, "index": i, "frequency": 0.1, "max_act": float(i)} for i in range(5)
    ]
    with Session(db_engine) as session, session.begin():
        keys = upsert(session, Feature, rows)
    assert sorted(keys) == [(run_id, 1, i) for i in range(5)]
    with Session(db_engine) as session, session.begin():
        upsert(session, Feature, [{**r, "max_act": 10.0 + r["index"]} for r in rows])
        upsert(session, Feature, {"run_id": run_id, "layer": 1, "index": 0, "label": "hesitation"})
    with Session(db_engine) as session:
        features = session.scalars(select(Feature).order_by(Feature.index)).all()
    assert [f.max_act for f in features] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert features[0].label == "hesitation" and features[0].frequency == 0.1  # untouched columns kept


def test_upsert_on_a_unique_key_returns_the_existing_id(db_engine: Engine) -> None:
    with Session(db_engine) as session, session.begin():
        run_id = _run(session)
        graph = {"run_id": run_id, "slug": "g", "prompt": "p", "nodes": [], "links": []}
        (first,) = upsert(session, Graph, graph, key=["run_id", "slug"])
        (second,) = upsert(session, Graph, {**graph, "nodes": [1]}, key=["run_id", "slug"])
    assert first == second
    with Session(db_engine) as session:
        assert session.scalars(select(Graph.nodes)).all() == [[1]]


def test_upsert_and_replace_batch_under_parameter_limits(db_engine: Engine, monkeypatch) -> None:
    monkeypatch.setattr(write, "MAX_BOUND_PARAMS", 30)  # 10 rows of 3 columns per statement
    with Session(db_engine) as session, session.begin():
        run_id = _run(session)
        rows = [{"run_id": run_id, "step": i, "metrics": {"loss": i}} for i in range(95)]
        assert sorted(upsert(session, RunMetric, rows)) == [(run_id, i) for i in range(95)]
        assert (
            replace_rows(
                session, RunMetric, {"run_id": run_id}, [{"step": i, "metrics": {}} for i in range(45)]
            )
            == 45
        )
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(RunMetric)) == 45


def test_upsert_rejects_bad_input(db_engine: Engine) -> None:
    with Session(db_engine) as session:
        with pytest.raises(ValueError, match="Unknown column"):
            upsert(session, RunMetric, {"run_id": 1, "step": 0, "nope": 1})
        with pytest.raises(ValueError, match="key column"):
            upsert(session, RunMetric, {"run_id": 1, "metrics": {}})


def test_replace_rows_never_duplicates(db_engine: Engine) -> None:
    with Session(db_engine) as session, session.begin():
        run_id = _run(session)
    feature = {"run_id": run_id, "layer": 2, "index": 5, "kind": "top"}

    def examples(n: int, act: float) -> list[dict]:
        return [
            {"rank": r, "token_ids": [1, 2], "acts": [0.0, act], "focus": 1, "max_act": act} for r in range(n)
        ]

    for n, act in [(4, 1.0), (4, 2.0), (3, 3.0)]:  # a re-run replaces the batch
        with Session(db_engine) as session, session.begin():
            assert replace_rows(session, Example, feature, examples(n, act)) == n
    with Session(db_engine) as session:
        got = session.execute(select(Example.rank, Example.max_act).order_by(Example.rank)).all()
    assert got == [(0, 3.0), (1, 3.0), (2, 3.0)]
    with Session(db_engine) as session, pytest.raises(ValueError, match="non-empty filter"):
        replace_rows(session, Example, {}, [])


def test_session_scope_rolls_back(db_engine: Engine) -> None:
    factory = make_sessionmaker(db_engine)
    with pytest.raises(RuntimeError), session_scope(factory) as session:
        _run(session, "rolled-back")
        raise RuntimeError
    with session_scope(factory) as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 0


def test_sqlite_pragmas(sqlite_db_url: str) -> None:
    engine = make_engine(sqlite_db_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_generated_nul_tokens_are_stored_as_a_visible_symbol(db_engine: Engine) -> None:
    """A model can generate the byte 0x00; Postgres text and jsonb refuse NUL, so writers store ␀ instead."""
    from app.db.schema import Ablation, AblationToken
    from app.db.text import has_nul, storable

    assert storable("a\x00b\x00") == "a\u2400b\u2400" and storable("plain") == "plain"
    assert has_nul("x\x00") and not has_nul(storable("x\x00"))
    with session_scope(make_sessionmaker(db_engine)) as s:
        run = Run(name="nul", base_model="b", target_model="t", config={}, status="ready")
        s.add(run)
        s.flush()
        ab = Ablation(run_id=run.id, status="running", request={"prompt": storable("p\x00")})
        s.add(ab)
        s.flush()
        upsert(s, AblationToken, [{"ablation_id": ab.id, "condition": "ablated", "step": 0, "token_id": 0,
                                   "token_str": storable("\x00"), "logprob": -1.0, "kl": None}])
        ab_id, run_id = ab.id, run.id
    with Session(db_engine) as s:
        assert s.get(AblationToken, (ab_id, "ablated", 0)).token_str == "\u2400"
        assert s.get(Ablation, ab_id).request == {"prompt": "p\u2400"}
        s.delete(s.get(Run, run_id))
        s.commit()
