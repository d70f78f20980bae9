"""The worker loop end to end: handlers, failures, cancellation, a killed worker, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import tests.db.handlers_for_tests  # noqa: F401 (registers test.write and test.fail)
from app.db import queue
from app.db.schema import Job, JobStatus, Run, RunMetric, Worker
from app.settings import Settings
from worker.handlers import JobContext, get_handler, register, registered_kinds, unregister
from worker.loop import run_inline, run_worker

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # seconds to wait for a subprocess to reach a state before failing the test


def _run(engine: Engine) -> int:
    with Session(engine) as session, session.begin():
        run = Run(name="run", base_model="base", target_model="target")
        session.add(run)
        session.flush()
        return run.id


def _metrics(engine: Engine, run_id: int) -> list[tuple[int, dict]]:
    with Session(engine) as session:
        rows = session.execute(select(RunMetric.step, RunMetric.metrics).where(RunMetric.run_id == run_id))
        return sorted((step, metrics) for step, metrics in rows)


def _until(predicate: Callable[[], bool], what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"worker exited ({proc.returncode}) before {what}:\n{out}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _run_worker_quietly(settings: Settings, **kw) -> int:
    return run_worker(settings, wait=False, handler_modules=[], migrate=False, **kw)


@pytest.fixture
def worker_proc(db_url: str) -> Iterator[Callable[[float], subprocess.Popen]]:
    """Start real worker subprocesses (``tests.db.worker_main``); killed at teardown if still alive."""
    procs: list[subprocess.Popen] = []

    def start(lease_s: float) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.db.worker_main", db_url, str(lease_s)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ---------------------------------------------------------------------------------- in-process loop


def test_runs_handler_and_stores_result(db_engine: Engine, db_settings: Settings) -> None:
    run_id = _run(db_engine)
    job_id = queue.enqueue(db_engine, "test.write", {"run_id": run_id, "steps": 4}, run_id=run_id)
    assert _run_worker_quietly(db_settings) == 1
    job = queue.get_job(db_engine, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.result == {"steps": 4, "attempt": 1}
    assert job.progress == {"done": 4, "total": 4, "message": "written"}
    assert [step for step, _ in _metrics(db_engine, run_id)] == [0, 1, 2, 3]
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(Worker)) == 0  # unregistered on exit


def test_failing_job_records_traceback_and_retries_to_the_limit(
    db_engine: Engine, db_settings: Settings
) -> None:
    job_id = queue.enqueue(db_engine, "test.fail", {"message": "kaput"}, max_attempts=3)
    assert _run_worker_quietly(db_settings) == 3
    job = queue.get_job(db_engine, job_id)
    assert job.status is JobStatus.FAILED and job.attempts == 3
    assert "Traceback (most recent call last)" in job.error and "RuntimeError: kaput" in job.error
    assert "always_fail" in job.error


def test_unknown_kind_and_invalid_payload_fail_clearly(db_engine: Engine, db_settings: Settings) -> None:
    unknown = queue.enqueue(db_engine, "no.such.kind", {})
    invalid = queue.enqueue(db_engine, "test.write", {"run_id": "not-a-number"})
    assert _run_worker_quietly(db_settings) == 2
    u, i = queue.get_job(db_engine, unknown), queue.get_job(db_engine, invalid)
    assert u.status is JobStatus.FAILED and u.attempts == 1
    assert "No handler registered for job kind 'no.such.kind'" in u.error and "test.write" in u.error
    assert i.status is JobStatus.FAILED and i.attempts == 1
    assert "Invalid payload for job kind 'test.write'" in i.error and "run_id" in i.error


def test_pipeline_runs_in_dependency_order(db_engine: Engine, db_settings: Settings) -> None:
    run_id = _run(db_engine)
    first = queue.enqueue(db_engine, "test.write", {"run_id": run_id, "steps": 1})
    second = queue.enqueue(
        db_engine, "test.write", {"run_id": run_id, "steps": 2}, depends_on=first, priority=9
    )
    assert _run_worker_quietly(db_settings) == 2
    a, b = queue.get_job(db_engine, first), queue.get_job(db_engine, second)
    assert a.status is b.status is JobStatus.SUCCEEDED
    assert a.finished <= b.started


def test_cancel_running_job(db_engine: Engine, db_settings: Settings) -> None:
    run_id = _run(db_engine)
    job_id = queue.enqueue(db_engine, "test.write", {"run_id": run_id, "hold_on_attempts": [1]})
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker,
        args=(db_settings,),
        kwargs={"stop_event": stop, "handler_modules": [], "migrate": False, "idle_wait_s": 0.1},
    )
    thread.start()
    try:
        _until(lambda: queue.get_job(db_engine, job_id).progress is not None, "the job to write")
        assert queue.cancel(db_engine, job_id)
        _until(lambda: queue.get_job(db_engine, job_id).locked_until is None, "the handler to stop")
    finally:
        stop.set()
        thread.join(WAIT_S)
    assert not thread.is_alive()
    job = queue.get_job(db_engine, job_id)
    assert job.status is JobStatus.CANCELLED and job.result is None


def test_idle_worker_stops_on_event(db_settings: Settings) -> None:
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker,
        args=(db_settings,),
        kwargs={"stop_event": stop, "handler_modules": [], "migrate": False},
    )
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    stop.set()
    thread.join(WAIT_S)
    assert not thread.is_alive() and time.monotonic() - t0 < 3


def test_register_rejects_non_models_and_conflicts() -> None:
    with pytest.raises(TypeError, match="pydantic BaseModel"):
        register("test.bad", dict)  # type: ignore[arg-type]

    class P(BaseModel):
        x: int = 0

    @register("test.tmp", P)
    def one(ctx: JobContext) -> None: ...

    try:
        with pytest.raises(ValueError, match="already handled"):

            @register("test.tmp", P)
            def other(ctx: JobContext) -> None: ...

        assert "test.tmp" in registered_kinds() and get_handler("test.tmp").func is one
    finally:
        unregister("test.tmp")


def test_run_inline_runs_handler_without_queue(db_engine: Engine, db_settings: Settings) -> None:
    run_id = _run(db_engine)
    result = run_inline(
        db_settings, "test.write", {"run_id": run_id, "steps": 2}, show_progress=False, handler_modules=[]
    )
    assert result == {"steps": 2, "attempt": 1}
    assert len(_metrics(db_engine, run_id)) == 2
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    with pytest.raises(ValueError, match="Invalid payload for 'test.write'"):
        run_inline(db_settings, "test.write", {"steps": 2}, show_progress=False, handler_modules=[])


# ------------------------------------------------------------------------------------ real processes


def test_killed_worker_job_is_reclaimed_without_duplicates(
    db_engine: Engine, db_settings: Settings, worker_proc
) -> None:
    run_id = _run(db_engine)
    job_id = queue.enqueue(db_engine, "test.write", {"run_id": run_id, "steps": 3, "hold_on_attempts": [1]})
    lease_s = 1.0
    proc = worker_proc(lease_s)
    _until(lambda: len(_metrics(db_engine, run_id)) == 3, "the first attempt to write", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(WAIT_S)
    held = queue.get_job(db_engine, job_id)
    assert held.status is JobStatus.RUNNING and held.attempts == 1
    assert queue.claim_job(db_engine, "impatient") is None  # the dead worker's lease still holds
    time.sleep(max(0.0, (held.locked_until - queue.utcnow()).total_seconds()) + 0.1)
    assert _run_worker_quietly(db_settings, lease_s=lease_s) == 1
    job = queue.get_job(db_engine, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
    assert _metrics(db_engine, run_id) == [(i, {"attempt": 2}) for i in range(3)]  # replaced, not added


def test_sigterm_releases_current_job(db_engine: Engine, worker_proc) -> None:
    run_id = _run(db_engine)
    job_id = queue.enqueue(db_engine, "test.write", {"run_id": run_id, "hold_on_attempts": [1]})
    proc = worker_proc(30.0)
    _until(lambda: queue.get_job(db_engine, job_id).progress is not None, "the job to start", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "released" in out
    job = queue.get_job(db_engine, job_id)
    assert job.status is JobStatus.TODO and job.attempts == 0 and job.locked_by is None
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(Worker)) == 0


def test_sigint_stops_an_idle_worker(db_engine: Engine, worker_proc) -> None:
    proc = worker_proc(30.0)

    def registered() -> bool:
        with Session(db_engine) as session:
            return session.scalar(select(func.count()).select_from(Worker)) == 1

    _until(registered, "the worker to register", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out
    assert not registered()
