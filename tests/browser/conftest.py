"""Real headless Chromium against the real server (a subprocess on 127.0.0.1, a free port).

After datasette's ``tests/test_playwright.py``: start the server, poll until it answers, fail fast
with its output, stop it in ``finally``; find elements by data-attributes. Screenshots of every page
go to ``./test-artifacts/`` (git-ignored) for people to look at.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.db.migrate import upgrade
from app.db.session import make_engine
from tests.seed import World, seed_world

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
START_TIMEOUT_S = 30  # seconds the server may take to answer its first request
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT)


def start_server(database_url: str, data_dir: Path, log: Path) -> Server:
    """``python -m app.web`` on a free port; waits until ``/api/`` answers or fails with the server log."""
    port = free_port()
    proc = start_process(["-m", "app.web", "--port", str(port)],
                         {"DATABASE_URL": database_url, "ADAPTERLENS_DATA_DIR": str(data_dir)}, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/api/", timeout=2) as resp:
                if resp.status == 200:
                    return Server(url, proc, log)
        except OSError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"the server did not answer within {START_TIMEOUT_S}s:\n{log.read_text()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, World]:
    """A migrated SQLite store holding the seeded world (built once for the browser tests)."""
    root = tmp_path_factory.mktemp("browser-db")
    url = f"sqlite:///{root / 'adapterlens.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        world = seed_world(engine, root / "tokenizer")
    finally:
        engine.dispose()
    return url, root, world


@pytest.fixture(scope="session")
def server(seeded: tuple[str, Path, World], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url, root, _ = seeded
    srv = start_server(url, root, tmp_path_factory.mktemp("logs") / "server.log")
    try:
        yield srv
    finally:
        _stop(srv.process)


@pytest.fixture(scope="session")
def world(seeded: tuple[str, Path, World]) -> World:
    return seeded[2]


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: object) -> Iterator[object]:
    """A fresh browser page (1400×900); console errors fail the test unless listed in ``page.allowed_errors``."""
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(10_000)  # milliseconds
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(f"{msg.text} ({msg.location.get('url')})") if msg.type == "error" else None)
    try:
        yield pg
    finally:
        context.close()
    allowed = getattr(pg, "allowed_errors", ())  # e.g. the 4xx a test provokes on purpose
    unexpected = [e for e in errors if not any(a in e for a in allowed)]
    assert not unexpected, f"JavaScript errors: {unexpected}"


def shot(page: object, name: str) -> Path:
    """Save a full-page screenshot as test-artifacts/<name>.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
