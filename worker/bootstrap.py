"""First start of a deployment: queue the demo pipeline once, however many processes try at the same time.

Compose's one-shot ``migrate`` service calls ``adapterlens bootstrap`` after ``db upgrade``; a person
may run it by hand too, or start several stacks against one database. "Queue the demo pipeline when
the store has no run" is a check-then-act, so two callers could both see an empty store and queue it
twice. The check and the enqueue therefore run under one lock: a Postgres advisory lock (held by a
dedicated connection for the duration), or an exclusive file lock beside the SQLite file. Torch-free:
it runs in the web image.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from worker.demo import enqueue_demo_pipeline, has_runs

log = logging.getLogger(__name__)

PG_BOOTSTRAP_LOCK_KEY = 0x4144_4C42_4F4F  # "ADLBOO": advisory lock id held while bootstrapping


@contextmanager
def bootstrap_lock(engine: Engine) -> Iterator[None]:
    """Serialise bootstrappers of one database (advisory lock on Postgres, file lock on SQLite)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_BOOTSTRAP_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_BOOTSTRAP_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        path = Path(database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".bootstrap-lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    yield  # an in-memory database has a single process by construction


def bootstrap(engine: Engine, *, demo: bool = True, organism_preset: str = "organism",
              train_preset: str = "organism", seed: int = 0) -> dict[str, int] | None:
    """Queue the demo pipeline when the store has no run; returns {step: job id}, or None when nothing was queued.

    Idempotent and safe to call concurrently: the second caller finds the run the first one created.
    ``demo=False`` makes it a no-op (deployments that only import released adapters).
    """
    if not demo:
        log.info("bootstrap: the demo pipeline is disabled")
        return None
    with bootstrap_lock(engine):
        if has_runs(engine):
            log.info("bootstrap: the store already has runs; nothing queued")
            return None
        return enqueue_demo_pipeline(engine, organism_preset=organism_preset, train_preset=train_preset, seed=seed)
