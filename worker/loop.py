"""The worker loop: claim a job, run its handler under a heartbeat, record the outcome, repeat.

Shape after procrastinate's ``worker.py``: drain the queue, then wait for a notification (Postgres
LISTEN), the poll interval, or a stop. SIGTERM/SIGINT ask the loop to stop: the running handler
sees ``ctx.cancelled()`` turn true; if it stops early (raises ``JobInterrupted``) its job is
released back to ``todo`` without counting an attempt, if it finishes its result is kept, and then
the worker exits. A second signal aborts at once (the job is released). A worker killed outright
stops heartbeating; its lease lapses and another worker claims the job again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import queue
from app.db.migrate import upgrade
from app.db.schema import JobStatus
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from worker.handlers import JobContext, JobInterrupted, UnknownJobKind, get_handler, load_handlers

log = logging.getLogger(__name__)

IDLE_WAIT_S = 5.0  # seconds to wait for a notification before polling the queue again
STALE_WORKER_S = 600.0  # seconds of silence after which a workers row is pruned at a worker's start


class WorkerAbort(BaseException):  # noqa: N818 (a control-flow signal like KeyboardInterrupt)
    """Raised in the main thread by a second SIGTERM/SIGINT: release the job and exit now."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Heartbeat(threading.Thread):
    """Renews the job's lease (and the worker's row) every third of the lease while a handler runs."""

    def __init__(self, engine: Engine, job_id: int, worker_id: str, lease_s: float) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.engine, self.job_id, self.worker_id, self.lease_s = engine, job_id, worker_id, lease_s
        self.lost = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        interval = max(self.lease_s / 3, 0.05)
        while not self._done.wait(interval):
            try:
                if not queue.heartbeat(self.engine, self.job_id, self.worker_id, self.lease_s):
                    self.lost.set()  # cancelled, or the lease lapsed and someone else holds it
                    return
                queue.worker_heartbeat(self.engine, self.worker_id)
            except Exception:
                log.exception("Heartbeat for job %s failed; retrying", self.job_id)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return result


def process_job(
    engine: Engine,
    session_factory: sessionmaker[Session],
    job: queue.JobRecord,
    worker_id: str,
    *,
    lease_s: float = queue.DEFAULT_LEASE_S,
    stop: threading.Event | None = None,
    settings: Settings | None = None,
) -> JobStatus | None:
    """Run one claimed job to an outcome; returns the job's status afterwards."""
    stop = stop or threading.Event()
    try:
        spec = get_handler(job.kind)
        payload = spec.payload_model.model_validate(job.payload)
    except UnknownJobKind as exc:
        queue.fail(engine, job.id, str(exc), worker_id=worker_id, permanent=True)
        log.error("Job %s: %s", job.id, exc)
        return JobStatus.FAILED
    except ValidationError as exc:
        queue.fail(
            engine,
            job.id,
            f"Invalid payload for job kind {job.kind!r}:\n{exc}",
            worker_id=worker_id,
            permanent=True,
        )
        log.error("Job %s has an invalid %s payload", job.id, job.kind)
        return JobStatus.FAILED

    beat = _Heartbeat(engine, job.id, worker_id, lease_s)
    ctx = JobContext(
        job_id=job.id,
        kind=job.kind,
        payload=payload,
        session_factory=session_factory,
        run_id=job.run_id,
        attempt=job.attempts,
        stop_event=_AnyEvent(stop, beat.lost),
        settings=settings,
    )
    beat.start()
    log.info("Job %s (%s) started", job.id, job.kind)
    try:
        result = spec.func(ctx)
    except JobInterrupted:
        beat.stop()
        if queue.is_cancelled(engine, job.id):
            log.info("Job %s cancelled", job.id)
            return JobStatus.CANCELLED
        if stop.is_set() or beat.lost.is_set():
            queue.release(engine, job.id, worker_id)
            log.info("Job %s released (worker stopping)", job.id)
            return JobStatus.TODO
        return queue.fail(engine, job.id, traceback.format_exc(), worker_id=worker_id)
    except BaseException as exc:
        beat.stop()
        if not isinstance(exc, Exception):  # WorkerAbort, KeyboardInterrupt, SystemExit
            queue.release(engine, job.id, worker_id)
            log.warning("Job %s released: worker aborted", job.id)
            raise
        status = queue.fail(engine, job.id, traceback.format_exc(), worker_id=worker_id)
        log.exception("Job %s (%s) failed; now %s", job.id, job.kind, status)
        return status
    beat.stop()
    try:
        done = queue.complete(engine, job.id, _jsonable(result), worker_id=worker_id)
    except Exception:
        return queue.fail(
            engine,
            job.id,
            "Storing the result failed:\n" + traceback.format_exc(),
            worker_id=worker_id,
            permanent=True,
        )
    if not done:
        log.warning("Job %s finished but was cancelled or re-claimed meanwhile; result dropped", job.id)
        return None
    log.info("Job %s (%s) succeeded", job.id, job.kind)
    return JobStatus.SUCCEEDED


class _AnyEvent(threading.Event):
    """An Event that also reads as set when any of the given events is set (stop or lease lost)."""

    def __init__(self, *events: threading.Event) -> None:
        super().__init__()
        self._events = events

    def is_set(self) -> bool:
        return super().is_set() or any(e.is_set() for e in self._events)


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    def handle(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            raise WorkerAbort(f"{name} received twice")
        log.warning(
            "%s received: finishing or releasing the current job, then exiting (again to abort)", name
        )
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def run_worker(
    settings: Settings,
    *,
    kinds: Sequence[str] | None = None,
    wait: bool = True,
    worker_id: str | None = None,
    stop_event: threading.Event | None = None,
    lease_s: float = queue.DEFAULT_LEASE_S,
    idle_wait_s: float = IDLE_WAIT_S,
    handler_modules: Sequence[str] | None = None,
    migrate: bool = True,
) -> int:
    """Process jobs until stopped (or, with ``wait=False``, until none is claimable); returns the count.

    ``kinds`` limits which jobs this worker claims (None: all; a job whose kind has no handler
    fails with a clear error). ``handler_modules`` are imported to register handlers (default:
    every module of the ``worker`` package). Signal handlers are installed only in the main thread.
    """
    stop = stop_event or threading.Event()
    worker_id = worker_id or default_worker_id()
    if migrate:
        upgrade(settings.db_url)
    known = load_handlers(handler_modules)
    log.info("Worker %s starting; handlers: %s", worker_id, ", ".join(known) or "none")
    engine = make_engine(settings)
    session_factory = make_sessionmaker(engine)
    restore = (
        _install_signal_handlers(stop) if threading.current_thread() is threading.main_thread() else None
    )
    processed = 0
    listener: queue.JobListener | None = None
    try:
        queue.register_worker(engine, worker_id, socket.gethostname(), os.getpid())
        queue.prune_workers(engine, older_than_s=max(STALE_WORKER_S, 3 * lease_s))
        listener = queue.JobListener(engine, kinds) if wait else None
        while not stop.is_set():
            job = queue.claim_job(engine, worker_id, kinds, lease_s)
            if job is None:
                if listener is None:
                    break
                queue.worker_heartbeat(engine, worker_id)
                listener.wait(idle_wait_s, stop)
                continue
            process_job(
                engine, session_factory, job, worker_id, lease_s=lease_s, stop=stop, settings=settings
            )
            processed += 1
    except WorkerAbort:
        log.warning("Worker %s aborted", worker_id)
    finally:
        if listener is not None:
            listener.close()
        try:
            queue.unregister_worker(engine, worker_id)
        finally:
            if restore is not None:
                restore()
            engine.dispose()
    log.info("Worker %s stopped after %d job(s)", worker_id, processed)
    return processed


def run_inline(
    settings: Settings,
    kind: str,
    payload: dict[str, Any] | BaseModel,
    *,
    show_progress: bool = True,
    handler_modules: Sequence[str] | None = None,
) -> Any:
    """Run ``kind``'s handler in the foreground, without the queue (the CLI's commands).

    Progress goes to a tqdm bar; the result is returned as the handler returned it.
    """
    from tqdm import tqdm

    load_handlers(handler_modules)
    spec = get_handler(kind)
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    try:
        validated = spec.payload_model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"Invalid payload for {kind!r}: {exc}") from exc
    engine = make_engine(settings)
    bar: Any = None

    def on_progress(done: float, total: float | None, message: str | None) -> None:
        nonlocal bar
        if not show_progress:
            return
        if bar is None or (total is not None and bar.total != total):
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=kind)
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    ctx = JobContext(
        job_id=None,
        kind=kind,
        payload=validated,
        session_factory=make_sessionmaker(engine),
        run_id=getattr(validated, "run_id", None),
        on_progress=on_progress,
        settings=settings,
    )
    try:
        return spec.func(ctx)
    finally:
        if bar is not None:
            bar.close()
        engine.dispose()
