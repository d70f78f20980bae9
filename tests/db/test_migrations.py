"""Migrations build exactly the models' schema, on SQLite and Postgres, and run down and up again."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool, text
from sqlalchemy.engine import Engine

from app.db.migrate import current_revision, downgrade, head_revision, is_up_to_date, upgrade
from app.db.schema import SEARCH_SHADOW_TABLES, Base, include_name

ALL_TABLES = set(Base.metadata.tables)


def _diff(url: str) -> list:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True, "include_name": include_name}),
                Base.metadata
            )
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"} - SEARCH_SHADOW_TABLES
    finally:
        engine.dispose()


def test_upgraded_schema_matches_models(db_url: str) -> None:
    assert is_up_to_date(db_url)
    assert _tables(db_url) == ALL_TABLES
    assert _diff(db_url) == []


def test_down_up_round_trip(db_url: str) -> None:
    downgrade(db_url)
    assert _tables(db_url) == set()
    upgrade(db_url)
    upgrade(db_url)  # idempotent
    assert _tables(db_url) == ALL_TABLES
    assert _diff(db_url) == []
    downgrade(db_url)
    upgrade(db_url)
    assert is_up_to_date(db_url)


def _upgrade_concurrently(url: str) -> None:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            upgrade(url)
        except BaseException as exc:  # noqa: BLE001 (collected and asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _diff(url) == []
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    engine.dispose()


def test_concurrent_first_upgrade_sqlite(tmp_path: Path) -> None:
    """The app and a worker both migrate on start: a fresh database must survive the race."""
    _upgrade_concurrently(f"sqlite:///{tmp_path / 'fresh.db'}")


@pytest.mark.postgres
def test_concurrent_first_upgrade_postgres(pg_server_url: str, pg_admin: Engine) -> None:
    name = f"adapterlens_fresh_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        _upgrade_concurrently(pg_server_url.rsplit("/", 1)[0] + f"/{name}")
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
