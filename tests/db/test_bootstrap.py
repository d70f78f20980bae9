"""`adapterlens bootstrap` (compose's first start): the demo pipeline is queued once, even by racing callers."""

from __future__ import annotations

import threading

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from app.db.schema import Job, Run
from app.db.session import make_engine, make_sessionmaker
from worker.bootstrap import bootstrap
from worker.demo import DEMO_STEPS


def _counts(engine: Engine) -> tuple[int, int]:
    with make_sessionmaker(engine)() as s:
        return s.scalar(select(func.count()).select_from(Run)), s.scalar(select(func.count()).select_from(Job))


def test_bootstrap_queues_the_demo_once(db_engine: Engine) -> None:
    jobs = bootstrap(db_engine, organism_preset="organism-tiny", train_preset="organism-tiny")
    assert list(jobs) == list(DEMO_STEPS)
    # each step waits for the one before; collect right after train, so the feature pages come first
    assert list(jobs) == ["organism", "train", "collect", "evaluate", "hesitation"]
    with make_sessionmaker(db_engine)() as s:
        depends = {j.kind: j.depends_on for j in s.scalars(select(Job))}
    assert depends == {"organism": None, "train": jobs["organism"], "collect": jobs["train"],
                       "evaluate": jobs["collect"], "hesitation": jobs["evaluate"]}
    assert bootstrap(db_engine) is None  # a second start reuses everything
    assert _counts(db_engine) == (1, len(DEMO_STEPS))


def test_bootstrap_with_the_demo_disabled_queues_nothing(db_engine: Engine) -> None:
    assert bootstrap(db_engine, demo=False) is None
    assert _counts(db_engine) == (0, 0)


def test_concurrent_bootstraps_queue_one_pipeline(db_url: str) -> None:
    """Four replicas starting together on an empty store: one pipeline, not four (the lock holds)."""
    results: list[object] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        engine = make_engine(db_url)
        try:
            barrier.wait()
            results.append(bootstrap(engine, organism_preset="organism-tiny", train_preset="organism-tiny"))
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(r is not None for r in results) == 1
    engine = make_engine(db_url)
    try:
        assert _counts(engine) == (1, len(DEMO_STEPS))
    finally:
        engine.dispose()
