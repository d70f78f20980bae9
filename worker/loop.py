"""The worker loop: claim a job, run its handler under a heartbeat, record the outcome, repeat.

Shape after procrastinate's ``worker.py``: drain the queue, then wait for a notification (Postgres
LISTEN), the poll interval, or a stop. SIGTERM/SIGINT ask the loop to stop: the running handler
sees ``ctx.cancelled()`` turn true; if it stops early (raises ``JobInterrupted``) its job is
released back to ``todo`` without counting an attempt, if it finishes its result is kept, and then
the worker exits. A second signal aborts at once (the job is released). A worker killed outright
stops heartbeating; its lease lapses and another worker claims the job again.

A worker never exits because the database went away (a restart, a network cut): every queue call
waits and retries with backoff while the database cannot be reached (``retry_while_down``). Idle, it
keeps trying to claim; busy, the handler goes on computing (its progress and cancellation checks
skip a missing database), the heartbeat keeps retrying, and the outcome is recorded once the
database is back. A handler whose own write hit the outage has its job released (attempt given
back) and claimed again: handlers write idempotently, so the re-run duplicates nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import threading
import time
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
from app.db.session import is_disconnect, make_engine, make_sessionmaker, retry_while_down
from app.settings import Settings
from worker.handlers import JobContext, JobInterrupted, UnknownJobKind, get_handler, load_handlers

log = logging.getLogger(__name__)

IDLE_WAIT_S = 5.0  # seconds to wait for a notification before polling the queue again
STALE_WORKER_S = 600.0  # seconds of silence after which a workers row is pruned at a worker's start
PARENT_CHECK_S = 1.0  # seconds between checks that a supervised worker's parent (`up`) is still alive


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
        down_since: float | None = None
        while not self._done.wait(interval):
            try:
                if not queue.heartbeat(self.engine, self.job_id, self.worker_id, self.lease_s):
                    self.lost.set()  # cancelled, or the lease lapsed and someone else holds it
                    return
                queue.worker_heartbeat(self.engine, self.worker_id)
            except Exception as exc:
                if not is_disconnect(exc):
                    log.exception("Heartbeat for job %s failed; retrying", self.job_id)
                elif down_since is None:
                    down_since = time.monotonic()
                    log.warning("Heartbeat for job %s: database unreachable; the job goes on, retrying", self.job_id)
                continue
            if down_since is not None:
                log.warning("Heartbeat for job %s: database back after %.1f s", self.job_id,
                            time.monotonic() - down_since)
                down_since = None

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
    """Run one claimed job to an outcome; returns the job's status afterwards.

    Recording the outcome waits for the database when it is down (a finished job's result is not thrown
    away because of a restart); only a second signal (``WorkerAbort``) stops that wait.
    """
    stop = stop or threading.Event()

    def record(what: str, call: Callable[[], Any]) -> Any:
        return retry_while_down(call, f"recording job {job.id} {what}")

    try:
        spec = get_handler(job.kind)
        payload = spec.payload_model.model_validate(job.payload)
    except UnknownJobKind as exc:
        reason = str(exc)
        record("as failed", lambda: queue.fail(engine, job.id, reason, worker_id=worker_id, permanent=True))
        log.error("Job %s: %s", job.id, exc)
        return JobStatus.FAILED
    except ValidationError as exc:
        message = f"Invalid payload for job kind {job.kind!r}:\n{exc}"
        record("as failed", lambda: queue.fail(engine, job.id, message, worker_id=worker_id, permanent=True))
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
        if record("state", lambda: queue.is_cancelled(engine, job.id)):
            log.info("Job %s cancelled", job.id)
            return JobStatus.CANCELLED
        if stop.is_set() or beat.lost.is_set():
            record("as released", lambda: queue.release(engine, job.id, worker_id))
            log.info("Job %s released (worker stopping)", job.id)
            return JobStatus.TODO
        tb = traceback.format_exc()
        return record("as failed", lambda: queue.fail(engine, job.id, tb, worker_id=worker_id))
    except BaseException as exc:
        beat.stop()
        if not isinstance(exc, Exception):  # WorkerAbort, KeyboardInterrupt, SystemExit
            _release_quietly(engine, job.id, worker_id)
            log.warning("Job %s released: worker aborted", job.id)
            raise
        if is_disconnect(exc):  # the handler's own write met a database outage: give the job back, run it again
            log.warning("Job %s (%s) lost the database mid-job; releasing it to run again", job.id, job.kind)
            record("as released", lambda: queue.release(engine, job.id, worker_id))
            return JobStatus.TODO
        tb = traceback.format_exc()
        status = record("as failed", lambda: queue.fail(engine, job.id, tb, worker_id=worker_id))
        log.exception("Job %s (%s) failed; now %s", job.id, job.kind, status)
        return status
    beat.stop()
    try:
        done = record("as succeeded", lambda: queue.complete(engine, job.id, _jsonable(result), worker_id=worker_id))
    except Exception:
        tb = "Storing the result failed:\n" + traceback.format_exc()
        return record("as failed", lambda: queue.fail(engine, job.id, tb, worker_id=worker_id, permanent=True))
    if not done:
        log.warning("Job %s finished but was cancelled or re-claimed meanwhile; result dropped", job.id)
        return None
    log.info("Job %s (%s) succeeded", job.id, job.kind)
    return JobStatus.SUCCEEDED


def _release_quietly(engine: Engine, job_id: int, worker_id: str) -> None:
    """Release on an abort: one try (an abort must not wait for a database); the lease covers a failure."""
    try:
        queue.release(engine, job_id, worker_id)
    except Exception as exc:  # noqa: BLE001
        log.warning("Could not release job %s on abort (%s); its lease will lapse", job_id, type(exc).__name__)


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


def limit_threads(n: int | None = None) -> int:
    """Use ``n`` torch threads in this process (default: training/threads.py's choice; one inter-op), so that
    workers sharing a machine's cores do not oversubscribe them (``adapterlens up`` chooses ``n`` per worker
    class). Returns the count, 0 in a torch-free install (it runs no model job)."""
    if importlib.util.find_spec("torch") is None:
        return 0
    from training.threads import configure_torch  # sets the wait policy first when torch is not yet imported

    return configure_torch(n)


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Stop when the supervising process is gone (``up`` killed outright cannot signal its workers)."""
    def watch() -> None:
        while not stop.wait(PARENT_CHECK_S):
            if os.getppid() != parent_pid:
                log.warning("Supervisor (pid %d) is gone: stopping", parent_pid)
                stop.set()
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(
    settings: Settings,
    *,
    kinds: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
    wait: bool = True,
    worker_id: str | None = None,
    stop_event: threading.Event | None = None,
    lease_s: float | None = None,
    idle_wait_s: float = IDLE_WAIT_S,
    handler_modules: Sequence[str] | None = None,
    migrate: bool = True,
    restarts: int = 0,
    note: str | None = None,
    parent_pid: int | None = None,
) -> int:
    """Process jobs until stopped (or, with ``wait=False``, until none is claimable); returns the count.

    ``kinds`` limits which jobs this worker claims (None: all; a job whose kind has no handler
    fails with a clear error), ``exclude_kinds`` leaves some out (the long-job worker of ``up`` leaves
    the interactive kinds to its own worker). ``handler_modules`` are imported to register handlers
    (default: every module of the ``worker`` package). ``lease_s`` defaults to ``settings.lease_s``.
    ``restarts``, ``note`` and ``parent_pid`` come from a supervisor (``adapterlens up``). Signal
    handlers are installed only in the main thread. A database outage never ends the loop (see the
    module docstring); a stop during one ends it.
    """
    stop = stop_event or threading.Event()
    worker_id = worker_id or default_worker_id()
    lease_s = settings.lease_s if lease_s is None else lease_s
    if settings.torch_threads:
        limit_threads(settings.torch_threads)
    restore = (
        _install_signal_handlers(stop) if threading.current_thread() is threading.main_thread() else None
    )
    if parent_pid is not None:
        _watch_parent(parent_pid, stop)
    processed = 0
    listener: queue.JobListener | None = None
    engine = make_engine(settings)
    try:
        if migrate:
            retry_while_down(lambda: upgrade(settings.db_url), "migrating the store", stop=stop)
        known = load_handlers(handler_modules)
        log.info("Worker %s starting; handlers: %s", worker_id, ", ".join(known) or "none")
        session_factory = make_sessionmaker(engine)
        described = queue.describe_kinds(kinds, exclude_kinds)
        retry_while_down(lambda: queue.register_worker(engine, worker_id, socket.gethostname(), os.getpid(),
                                                       kinds=described, restarts=restarts, note=note),
                         "registering the worker", stop=stop)
        retry_while_down(lambda: queue.prune_workers(engine, older_than_s=max(STALE_WORKER_S, 3 * lease_s)),
                         "pruning silent workers", stop=stop)
        listener = queue.JobListener(engine, kinds, exclude_kinds) if wait else None
        delay = 0.0  # seconds to back off while the database is unreachable
        while not stop.is_set():
            try:
                job = queue.claim_job(engine, worker_id, kinds, lease_s, exclude_kinds=exclude_kinds)
                if job is None:
                    if listener is None:
                        break
                    queue.worker_heartbeat(engine, worker_id)
            except Exception as exc:
                if not is_disconnect(exc):
                    raise
                if delay == 0.0:
                    log.warning("Worker %s: database unreachable (%s); waiting for it", worker_id,
                                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
                delay = min(max(delay * 2, 0.2), 5.0)
                stop.wait(delay)
                continue
            if delay:
                log.warning("Worker %s: database back", worker_id)
                delay = 0.0
                # re-register: a restarted or restored database may have lost the row
                retry_while_down(lambda: queue.register_worker(
                    engine, worker_id, socket.gethostname(), os.getpid(), kinds=described, restarts=restarts,
                    note=note), "registering the worker", stop=stop)
            if job is None:
                listener.wait(idle_wait_s, stop)
                continue
            process_job(
                engine, session_factory, job, worker_id, lease_s=lease_s, stop=stop, settings=settings
            )
            processed += 1
    except WorkerAbort:
        log.warning("Worker %s aborted", worker_id)
    except Exception as exc:
        if not (is_disconnect(exc) and stop.is_set()):  # stopped while waiting for the database: a clean exit
            raise
        log.warning("Worker %s stopping while the database is unreachable", worker_id)
    finally:
        if listener is not None:
            listener.close()
        try:
            queue.unregister_worker(engine, worker_id)
        except Exception as exc:  # noqa: BLE001 (the row is pruned later; exiting matters more)
            log.warning("Worker %s could not unregister (%s)", worker_id, type(exc).__name__)
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
