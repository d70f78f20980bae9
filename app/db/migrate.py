"""Bring a database to the current schema (or back to empty), safely from several processes at once.

``adapterlens up`` starts the web server and a worker that both call :func:`upgrade` on start, so
two processes may race on a fresh database. Postgres serialises them with an advisory lock;
SQLite with an exclusive file lock next to the database file. Upgrading an up-to-date database is
a no-op, so calling it on every start is cheap and idempotent.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = REPO_ROOT / "migrations"
PG_LOCK_KEY = 0x4144_4C45_4E53  # "ADLENS": advisory lock id held while migrating


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at ``migrations/``; with ``connection`` it migrates on that one."""
    if not MIGRATIONS_DIR.is_dir():
        raise FileNotFoundError(
            f"Migrations folder not found at {MIGRATIONS_DIR}; install the clone with `pip install -e .`"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["configure_logger"] = False
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def _locked_connection(url: str) -> Iterator[Connection]:
    """A connection holding the migration lock for its lifetime."""
    sa_url = make_url(url)
    sqlite = sa_url.get_backend_name() == "sqlite"
    lock_file = None
    if sqlite and sa_url.database and sa_url.database != ":memory:":
        db_path = Path(sa_url.database).expanduser()
        db_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(db_path.with_name(db_path.name + ".migrate-lock"), "w")  # noqa: SIM115
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    engine = create_engine(sa_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
                conn.commit()
            try:
                yield conn
                conn.commit()
            finally:
                if conn.dialect.name == "postgresql":
                    conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
                    conn.commit()
    finally:
        engine.dispose()
        if lock_file is not None:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            lock_file.close()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: the latest)."""
    with _locked_connection(url) as conn:
        before = current_revision(conn)
        command.upgrade(alembic_config(conn), revision)
        after = current_revision(conn)
    if before != after:
        log.info("Migrated %s from %s to %s", make_url(url).render_as_string(), before, after)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at ``url`` down to ``revision`` (default: empty)."""
    with _locked_connection(url) as conn:
        command.downgrade(alembic_config(conn), revision)


def current_revision(conn: Connection) -> str | None:
    """The revision the connected database is at, or None for an unmigrated database."""
    return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The latest revision in ``migrations/``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def is_up_to_date(url: str) -> bool:
    """Whether the database at ``url`` is at the latest revision (for health checks)."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return current_revision(conn) == head_revision()
    finally:
        engine.dispose()
