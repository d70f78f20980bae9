"""Workers survive the database: a real throwaway Postgres cluster is restarted (``pg_ctl restart -m fast``,
every session terminated) under an idle worker and a busy one, as separate processes.

Both must still be running afterwards and take new work; the busy job completes once, its rows are neither
lost nor duplicated, and its attempt is not spent on the outage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, pool, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from app.db import queue
from app.db.migrate import upgrade
from app.db.schema import JobStatus, Run, RunMetric, Worker
from app.db.session import make_engine
from tests.pg_cluster import ClusterError, ThrowawayCluster, pg_bindir

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 40.0  # seconds for a state to be reached (a restart and the workers' backoff included)
LEASE_S = 10.0  # longer than a restart: the busy job must stay its worker's


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    """A cluster of this module's own (it is restarted; the suite's cluster serves every other test)."""
    if os.environ.get("ADAPTERLENS_TEST_NO_PG", "") not in ("", "0"):
        pytest.skip("ADAPTERLENS_TEST_NO_PG is set")
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb): the restart tests need a cluster of their own")
    c = ThrowawayCluster(bindir)
    try:
        try:
            c.init()
            c.start()
        except ClusterError as exc:
            pytest.fail(str(exc))
        yield c
    finally:
        c.remove()


@pytest.fixture
def url(cluster: ThrowawayCluster) -> Iterator[str]:
    name = f"outage_{uuid.uuid4().hex[:10]}"
    admin = create_engine(cluster.url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = make_url(cluster.url).set(database=name).render_as_string(hide_password=False)
    upgrade(db_url)
    yield db_url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    e = make_engine(url)
    yield e
    e.dispose()


@pytest.fixture
def workers(url: str) -> Iterator[Callable[[], subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "tests.db.worker_main", url, str(LEASE_S)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        out, _ = proc.communicate()
        if os.environ.get("SHOW_WORKER_LOGS"):
            print(out)


def until(predicate: Callable[[], bool], what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a worker exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 (the test's own connection may hit the restart too)
            pass
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _run(engine: Engine) -> int:
    with Session(engine) as s, s.begin():
        run = Run(name=f"r{uuid.uuid4().hex[:6]}", base_model="b", target_model="t")
        s.add(run)
        s.flush()
        return run.id


def _rows(engine: Engine, run_id: int) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(RunMetric).where(RunMetric.run_id == run_id))


def _alive_workers(engine: Engine, since) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(Worker).where(Worker.heartbeat_at > since))


@pytest.mark.parametrize("kind", ["test.write", "test.steps"])
def test_restart_under_a_busy_and_an_idle_worker(cluster, engine, workers, kind):
    """``test.write`` holds (polling for cancellation) through the restart: it keeps its claim and completes.
    ``test.steps`` writes a row every 0.1 s: a write may meet the restart, then the job is released and runs
    again (attempt given back); either way it completes once with each row once."""
    procs = [workers(), workers()]
    run_id = _run(engine)
    payload = ({"run_id": run_id, "steps": 3, "hold_on_attempts": [1], "hold_s": 5.0} if kind == "test.write"
               else {"run_id": run_id, "steps": 40, "step_s": 0.1})
    job_id = queue.enqueue(engine, kind, payload, run_id=run_id)
    until(lambda: queue.get_job(engine, job_id).status is JobStatus.RUNNING and _rows(engine, run_id) >= 3,
          "the job to run", procs)
    until(lambda: _alive_workers(engine, queue.get_job(engine, job_id).started) == 2, "both workers to beat", procs)
    restarted = queue.utcnow()
    cluster.restart()
    engine.dispose()  # the test's own pooled connections died with the restart

    until(lambda: queue.get_job(engine, job_id).status is JobStatus.SUCCEEDED, "the busy job to complete", procs)
    job = queue.get_job(engine, job_id)
    assert job.attempts == 1 and job.result["attempt"] == 1, job
    assert _rows(engine, run_id) == payload["steps"]  # each once: none lost, none duplicated
    until(lambda: _alive_workers(engine, restarted) == 2, "both workers to beat again", procs)

    # Both still take work: two holding jobs at once need both of them.
    second = [queue.enqueue(engine, "test.write", {"run_id": _run(engine), "hold_on_attempts": [1], "hold_s": 1.0})
              for _ in range(2)]
    until(lambda: all(queue.get_job(engine, j).status is JobStatus.SUCCEEDED for j in second),
          "new jobs after the restart", procs)
    assert len({queue.get_job(engine, j).result["attempt"] for j in second}) == 1
    assert all(p.poll() is None for p in procs)
