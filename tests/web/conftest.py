"""A TestClient over the seeded world, on SQLite and Postgres (``db_url`` from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from app.db.session import make_engine
from app.settings import Settings
from app.web import create_app
from tests.seed import World, seed_world

BASE_URL = "http://127.0.0.1"  # a loopback Host (the default allow-list); requests carry it as Origin, like a page's


@dataclass
class Web:
    client: TestClient
    world: World
    engine: Engine

    @property
    def run(self) -> str:
        return f"/runs/{self.world.run_id}"


@pytest.fixture
def web(db_url: str, tmp_path: Path) -> Iterator[Web]:
    engine = make_engine(db_url)
    world = seed_world(engine, tmp_path / "tokenizer")
    app = create_app(Settings(database_url=db_url, data_dir=tmp_path), engine=engine)
    with TestClient(app, base_url=BASE_URL, headers={"Origin": BASE_URL}, raise_server_exceptions=True) as client:
        yield Web(client, world, engine)
    engine.dispose()


@pytest.fixture
def empty_web(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The app over a migrated database with nothing in it."""
    engine = make_engine(db_url)
    app = create_app(Settings(database_url=db_url, data_dir=tmp_path), engine=engine)
    with TestClient(app, base_url=BASE_URL, headers={"Origin": BASE_URL}, raise_server_exceptions=True) as client:
        yield client
    engine.dispose()
