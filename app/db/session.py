"""Engines and sessions for the store, built from Settings (never at import time).

SQLite gets the pragmas that make it a good multi-process store: WAL (readers never block the
writer), foreign keys (SQLite ignores ON DELETE CASCADE without them) and a busy timeout (a second
writer waits instead of failing with "database is locked"). The driver's default transaction
handling is kept on purpose: reads run outside a transaction and a write opens one, so a session
that reads and later writes never holds a stale WAL snapshot that would make its write fail.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000  # milliseconds a SQLite writer waits for the lock before failing


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
