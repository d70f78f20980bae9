"""Engines and sessions for the store, built from Settings (never at import time).

SQLite gets the pragmas that make it a good multi-process store: WAL (readers never block the
writer), foreign keys (SQLite ignores ON DELETE CASCADE without them) and a busy timeout (a second
writer waits instead of failing with "database is locked"). The driver's default transaction
handling is kept on purpose: reads run outside a transaction and a write opens one, so a session
that reads and later writes never holds a stale WAL snapshot that would make its write fail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000  # milliseconds a SQLite writer waits for the lock before failing
RECONNECT_FIRST_S = 0.2  # seconds before the first retry when the database cannot be reached
RECONNECT_MAX_S = 5.0  # seconds between retries at most (the wait doubles up to this)
_SQLITE_TRANSIENT = ("database is locked", "unable to open database file", "disk i/o error")

T = TypeVar("T")


def _url_of(target: str | Settings | None) -> str:
    if target is None:
        return Settings().db_url
    if isinstance(target, Settings):
        return target.db_url
    return target


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def make_engine(target: str | Settings | None = None, **kwargs: Any) -> Engine:
    """An engine for a URL or Settings (default: ``Settings()`` from the environment).

    ``postgres://`` URLs are normalised by Settings; a plain URL string is used as given.
    """
    url = make_url(_url_of(target))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    # Kept connections: a server process runs up to ~8 requests at once under load; with SQLAlchemy's default 5,
    # the rest opened and closed a connection each (benchmarks/web.py, 8 clients: 24 new Postgres sessions per
    # 800 feature pages, 5 with 10). Connections open lazily, so an idle worker holds one or two.
    kwargs.setdefault("pool_size", 10)
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (pages render after the commit)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# ---------------------------------------------------------------------------------------- outages


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database cannot answer right now" (a restart, a dropped connection, a lock),
    as opposed to a statement that is wrong and would fail again (an unknown table, a constraint).

    Postgres: any psycopg ``OperationalError`` or ``InterfaceError`` (server shutting down or starting,
    connection refused or lost, deadlock) or a connection SQLAlchemy invalidated. SQLite: a lock held too long
    or a file that cannot be opened.
    """
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    try:
        import psycopg

        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return True
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pass
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError):
        return any(m in str(exc).lower() for m in _SQLITE_TRANSIENT)
    return False


def retry_while_down(fn: Callable[[], T], what: str, *, stop: threading.Event | None = None,
                     give_up_s: float | None = None) -> T:
    """``fn()``, retried with exponential backoff for as long as the database cannot be reached.

    Any other error propagates at once. ``stop`` (set by a shutdown) or ``give_up_s`` end the waiting: the
    last disconnect error is raised. The first failure and the recovery are logged once each, not every try.
    """
    delay, started, failures = RECONNECT_FIRST_S, time.monotonic(), 0
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not is_disconnect(exc):
                raise
            failures += 1
            waited = time.monotonic() - started
            if failures == 1:
                log.warning("Database unreachable while %s (%s); retrying with backoff",
                            what, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            if (stop is not None and stop.is_set()) or (give_up_s is not None and waited >= give_up_s):
                raise
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
            continue
        if failures:
            log.warning("Database back after %.1f s (%s)", time.monotonic() - started, what)
        return result
