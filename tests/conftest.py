"""Suite-wide fixtures: reproducibility, no network, and fresh migrated databases on both backends.

Databases (after procrastinate's ``tests/conftest.py``): the schema is migrated once per session
into a template, and each test gets its own copy: ``CREATE DATABASE … TEMPLATE …`` on Postgres,
a copied file on SQLite. Postgres is ``ADAPTERLENS_TEST_PG_URL`` when set (a server URL whose
user may create databases), else a throwaway cluster started here with the local ``initdb`` on a
free port and deleted at the end. Without PostgreSQL binaries (or with ``ADAPTERLENS_TEST_NO_PG=1``)
the Postgres tier is skipped, with the reason in the report header and in each skip.

Fixtures for other test files: ``db_url`` (parametrized: sqlite, postgres), ``sqlite_db_url``,
``pg_db_url``, ``db_engine``, ``db_settings`` (Settings with a temp data dir and that database).
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Engine, make_url

from app.db.migrate import upgrade
from app.db.session import make_engine
from app.settings import Settings
from tests.pg_cluster import ClusterError, ThrowawayCluster, pg_bindir, stop_orphaned_clusters

os.environ["HF_HUB_OFFLINE"] = "1"  # before any import of huggingface_hub reads it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest_plugins = ["tests.organism_fixtures"]  # the tiny built organism and a trained run, shared

PG_URL_ENV = "ADAPTERLENS_TEST_PG_URL"
NO_PG_ENV = "ADAPTERLENS_TEST_NO_PG"  # set to 1 to run the SQLite tier alone (quick local runs)


# ---------------------------------------------------------------------------------- reproducibility


@pytest.fixture(autouse=True)
def _reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed every RNG in use and keep Hugging Face offline, for every test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    random.seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)
    if "torch" in sys.modules:  # seeded only when a test module already uses it
        sys.modules["torch"].manual_seed(0)


# --------------------------------------------------------------------------------------- postgres


def _pg_unavailable_reason() -> str | None:
    if os.environ.get(NO_PG_ENV, "") not in ("", "0"):
        return f"{NO_PG_ENV} is set: running the SQLite tier only"
    if os.environ.get(PG_URL_ENV) or pg_bindir() is not None:
        return None
    return (
        f"PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin) and "
        f"{PG_URL_ENV} is unset: running the SQLite tier only"
    )


def pytest_report_header(config: pytest.Config) -> str:
    reason = _pg_unavailable_reason()
    if reason:
        return f"databases: {reason}"
    if os.environ.get(PG_URL_ENV):
        return f"databases: SQLite and PostgreSQL from {PG_URL_ENV}"
    return f"databases: SQLite and a throwaway PostgreSQL cluster ({pg_bindir()})"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """The URL (database ``postgres``) of a Postgres server the tests may create databases on."""
    reason = _pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if os.environ.get(PG_URL_ENV):
        yield Settings(database_url=os.environ[PG_URL_ENV]).db_url
        return
    bindir = pg_bindir()
    assert bindir is not None  # _pg_unavailable_reason checked it
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run the throwaway cluster as")
    stop_orphaned_clusters(bindir)
    cluster = ThrowawayCluster(bindir)
    try:
        try:
            cluster.init()
            cluster.start()
        except ClusterError as exc:
            pytest.fail(str(exc))
        yield cluster.url
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def pg_admin(pg_server_url: str) -> Iterator[Engine]:
    """An autocommit engine on the server's maintenance database (CREATE/DROP DATABASE)."""
    engine = create_engine(pg_server_url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    yield engine
    engine.dispose()


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str, pg_admin: Engine) -> Iterator[str]:
    """Name of a database migrated to head, copied by every Postgres test."""
    name = f"adapterlens_tpl_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    upgrade(_with_database(pg_server_url, name))
    yield name
    with pg_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_db_url(pg_server_url: str, pg_admin: Engine, pg_template: str) -> Iterator[str]:
    """A fresh migrated Postgres database for one test, dropped afterwards."""
    name = f"adapterlens_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield _with_database(pg_server_url, name)
    with pg_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ----------------------------------------------------------------------------------------- sqlite


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head (checkpointed, so the file alone holds the schema)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "adapterlens.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture
def sqlite_db_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh migrated SQLite database file in the test's tmp_path."""
    target = tmp_path / "adapterlens.db"
    shutil.copyfile(sqlite_template, target)
    return f"sqlite:///{target}"


# ---------------------------------------------------------------------------------------- either


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh migrated database URL; tests using it run once per backend."""
    return request.getfixturevalue("sqlite_db_url" if request.param == "sqlite" else "pg_db_url")


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_settings(db_url: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test's database, with a temporary data directory."""
    return Settings(data_dir=tmp_path / "data", database_url=db_url)
