"""The job queue: named queries on the ``jobs`` and ``workers`` tables, for SQLite and Postgres.

Life of a job (``JobStatus``)::

    todo ──claim──▶ running ──complete──▶ succeeded
      ▲               │ ├──fail (attempts left)──▶ todo      (error keeps the traceback)
      │               │ ├──fail (none left)──────▶ failed
      └──release──────┘ └──lease lapses──▶ claimable again (counts an attempt), or failed if none left
    todo/running ──cancel──▶ cancelled            failed/cancelled ──retry──▶ todo

``attempts`` counts claims: each claim is one attempt, a release (clean shutdown) gives it back.
Dependencies: a job with ``depends_on`` is claimable only once that job *succeeded*. When the
dependency fails or is cancelled, the dependent fails too (error starts with ``DEPENDENCY_FAILED``),
transitively; ``retry`` of the dependency brings such dependents back to ``todo``.

Claiming is one statement on both backends (after procrastinate's ``procrastinate_fetch_job``):
``UPDATE jobs SET status='running' … WHERE id = (SELECT id … ORDER BY priority DESC, id LIMIT 1
[FOR UPDATE SKIP LOCKED]) RETURNING …``. On SQLite a write statement takes the database's single
write lock before it reads, so the subquery and the update are atomic without row locks.

Request rows (``ablations``, ``experiments``) follow their job in the same transaction wherever the job
changes from outside its handler (lapsed lease, fail, release, cancel, retry): ``app.db.request_rows``.
Workers come in classes: ``kinds`` (only these) and ``exclude_kinds`` (all but these) select what a worker
claims, so ``adapterlens up`` runs one worker for :data:`INTERACTIVE_KINDS` and one for everything else.

Timestamps compare against the worker's clock (aware UTC), so hosts need synchronised clocks.
Every function takes ``db``: an Engine (the call runs and commits its own transaction) or a
Session/Connection (the call joins its transaction and the caller commits, e.g. to insert an
ablation row and its job together). Enqueue fires ``NOTIFY adapterlens_jobs`` on Postgres; it is
delivered when the transaction commits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    String,
    and_,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from app.db.request_rows import follow_jobs
from app.db.schema import Job, JobStatus, Worker, utcnow

log = logging.getLogger(__name__)

CHANNEL = "adapterlens_jobs"  # Postgres LISTEN/NOTIFY channel fired when a job becomes claimable
DEFAULT_LEASE_S = 60.0  # seconds a claim lasts without a heartbeat before others may re-claim
POLL_INTERVAL_S = 0.25  # seconds between checks on SQLite (no LISTEN) and between stop checks
DEPENDENCY_FAILED = "Dependency failed:"  # prefix of the error of a job failed by its dependency

# Kinds a person waits for in the browser: they never queue behind long jobs (design.md, "Interactive vs long
# work"); every other kind (organism, train, evaluate, collect, hesitation, experiment, import, …) is long.
INTERACTIVE_KINDS: tuple[str, ...] = ("ablate", "attribute", "lens")

Db = Engine | Connection | Session
_jobs = Job.__table__
_workers = Worker.__table__


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one ``jobs`` row, detached from any session."""

    id: int
    kind: str
    payload: dict[str, Any]
    status: JobStatus
    priority: int
    attempts: int
    max_attempts: int
    run_id: int | None
    depends_on: int | None
    locked_by: str | None
    locked_until: datetime | None
    progress: dict[str, Any] | None
    result: Any
    error: str | None
    created: datetime | None
    started: datetime | None
    finished: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        m = row._mapping
        return cls(**{name: m[name] for name in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------ plumbing


@contextmanager
def _tx(db: Db) -> Iterator[Connection | Session]:
    """Run in ``db``'s transaction, or in a fresh committed one when given an Engine."""
    if isinstance(db, Engine):
        with db.begin() as conn:
            yield conn
    else:
        yield db


def _dialect(db: Db) -> str:
    if isinstance(db, Session):
        return db.get_bind().dialect.name
    return db.dialect.name


def _notify(conn: Connection | Session, message: str = "") -> None:
    if _dialect(conn) == "postgresql":
        conn.execute(select(func.pg_notify(CHANNEL, message)))


def _returning_cols() -> list[Any]:
    return [_jobs.c[name] for name in JobRecord.__dataclass_fields__]


# ------------------------------------------------------------------------------------------ enqueue


def enqueue(
    db: Db,
    kind: str,
    payload: dict[str, Any] | None = None,
    *,
    priority: int = 0,
    depends_on: int | None = None,
    run_id: int | None = None,
    max_attempts: int = 3,
    run_after: datetime | None = None,
) -> int:
    """Add a job and return its id. Higher ``priority`` runs first; ties run in id order."""
    if not kind:
        raise ValueError(f"Job kind must be a non-empty string, got {kind!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    with _tx(db) as conn:
        job_id = conn.execute(
            insert(_jobs)
            .values(
                kind=kind,
                payload=payload or {},
                status=JobStatus.TODO,
                priority=priority,
                attempts=0,
                max_attempts=max_attempts,
                depends_on=depends_on,
                run_id=run_id,
                run_after=run_after,
                created=utcnow(),
            )
            .returning(_jobs.c.id)
        ).scalar_one()
        _notify(conn, kind)
    log.debug("Enqueued job %s (%s, priority %s)", job_id, kind, priority)
    return job_id


# -------------------------------------------------------------------------------------------- claim


def _claimable(alias: Any, now: datetime, kinds: Sequence[str] | None,
               exclude_kinds: Sequence[str] | None = None) -> Any:
    dep = _jobs.alias("dep")
    dependency_ok = or_(
        alias.c.depends_on.is_(None),
        exists().where(dep.c.id == alias.c.depends_on, dep.c.status == JobStatus.SUCCEEDED),
    )
    ready_todo = and_(
        alias.c.status == JobStatus.TODO,
        or_(alias.c.run_after.is_(None), alias.c.run_after <= now),
        dependency_ok,
    )
    lapsed = and_(
        alias.c.status == JobStatus.RUNNING,
        alias.c.locked_until < now,
        alias.c.attempts < alias.c.max_attempts,
    )
    condition = or_(ready_todo, lapsed)
    if kinds is not None:
        condition = and_(condition, alias.c.kind.in_(list(kinds)))
    if exclude_kinds:
        condition = and_(condition, alias.c.kind.not_in(list(exclude_kinds)))
    return condition


def claim_job(
    db: Db,
    worker_id: str,
    kinds: Sequence[str] | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    *,
    exclude_kinds: Sequence[str] | None = None,
) -> JobRecord | None:
    """Claim the best claimable job for ``worker_id`` for ``lease_s`` seconds, or return None.

    Claimable: ``todo`` whose ``run_after`` passed and whose dependency succeeded, or ``running``
    whose lease lapsed (its worker died) with attempts left; of ``kinds`` (None: any) and not of
    ``exclude_kinds``. Order: priority desc, then id.
    """
    if kinds is not None and not kinds:
        return None
    reap(db)
    now = utcnow()
    cand = _jobs.alias("cand")
    subquery = (
        select(cand.c.id)
        .where(_claimable(cand, now, kinds, exclude_kinds))
        .order_by(cand.c.priority.desc(), cand.c.id)
        .limit(1)
    )
    if _dialect(db) == "postgresql":
        subquery = subquery.with_for_update(skip_locked=True, of=cand)
    stmt = (
        update(_jobs)
        .where(_jobs.c.id == subquery.scalar_subquery())
        .where(_jobs.c.status.in_([JobStatus.TODO, JobStatus.RUNNING]))
        .values(
            status=JobStatus.RUNNING,
            attempts=_jobs.c.attempts + 1,
            locked_by=worker_id,
            locked_until=now + timedelta(seconds=lease_s),
            heartbeat_at=now,
            started=now,
            finished=None,
        )
        .returning(*_returning_cols())
    )
    with _tx(db) as conn:
        row = conn.execute(stmt).first()
    if row is None:
        return None
    job = JobRecord.from_row(row)
    log.info(
        "Worker %s claimed job %s (%s), attempt %s/%s",
        worker_id,
        job.id,
        job.kind,
        job.attempts,
        job.max_attempts,
    )
    return job


def reap(db: Db) -> int:
    """Fail what can never run: lapsed leases with no attempts left, and dependents of failed jobs.

    Returns the number of jobs failed. Called by ``claim_job``; cheap when there is nothing to do.
    """
    now = utcnow()
    message = f"Lease expired on the last attempt (worker presumed dead at {now.isoformat()})."
    with _tx(db) as conn:
        lapsed = conn.execute(
            update(_jobs)
            .where(
                _jobs.c.status == JobStatus.RUNNING,
                _jobs.c.locked_until < now,
                _jobs.c.attempts >= _jobs.c.max_attempts,
            )
            .values(
                status=JobStatus.FAILED,
                finished=now,
                locked_by=None,
                locked_until=None,
                error=func.coalesce(_jobs.c.error + "\n", "") + message,
            )
            .returning(_jobs.c.id)
        ).scalars().all()
        if lapsed:
            follow_jobs(conn, list(lapsed), JobStatus.FAILED, "The worker running it stopped answering: " + message)
        n = len(lapsed) + _fail_dependents(conn)
    return n


def _fail_dependents(conn: Connection | Session) -> int:
    """Fail ``todo`` jobs whose dependency failed or was cancelled, transitively."""
    total = 0
    dep = _jobs.alias("dep")
    while True:
        bad_dep = (
            select(dep.c.id)
            .where(dep.c.id == _jobs.c.depends_on, dep.c.status.in_([JobStatus.FAILED, JobStatus.CANCELLED]))
            .exists()
        )
        n = conn.execute(
            update(_jobs)
            .where(_jobs.c.status == JobStatus.TODO, bad_dep)
            .values(
                status=JobStatus.FAILED,
                finished=utcnow(),
                error=literal(f"{DEPENDENCY_FAILED} job ")
                + cast(_jobs.c.depends_on, String)
                + " failed or was cancelled.",
            )
        ).rowcount
        total += n
        if n == 0:
            return total


# -------------------------------------------------------------------------------- during and after


def heartbeat(db: Db, job_id: int, worker_id: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Extend the lease; False when the job is no longer ours (cancelled, finished, re-claimed)."""
    now = utcnow()
    with _tx(db) as conn:
        n = conn.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id, _jobs.c.locked_by == worker_id, _jobs.c.status == JobStatus.RUNNING)
            .values(locked_until=now + timedelta(seconds=lease_s), heartbeat_at=now)
        ).rowcount
    return n == 1


def set_progress(
    db: Db, job_id: int, done: float, total: float | None = None, message: str | None = None
) -> None:
    """Record progress as ``{done, total, message}`` for pages and the CLI to show."""
    with _tx(db) as conn:
        conn.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id)
            .values(progress={"done": done, "total": total, "message": message})
        )


def _running(job_id: int, worker_id: str | None) -> list:
    """WHERE clauses: the job is running and, when ``worker_id`` is given, held by that worker."""
    cond = [_jobs.c.id == job_id, _jobs.c.status == JobStatus.RUNNING]
    if worker_id is not None:
        cond.append(_jobs.c.locked_by == worker_id)
    return cond


def complete(db: Db, job_id: int, result: Any = None, *, worker_id: str | None = None) -> bool:
    """Mark a running job succeeded with its result; False if it was cancelled or lost meanwhile."""
    now = utcnow()
    cond = _running(job_id, worker_id)
    with _tx(db) as conn:
        n = conn.execute(
            update(_jobs)
            .where(*cond)
            .values(
                status=JobStatus.SUCCEEDED, result=result, finished=now, locked_by=None, locked_until=None
            )
        ).rowcount
        if n:
            _notify(conn, "succeeded")  # dependents may have become claimable
        else:  # cancelled (or re-claimed) meanwhile: the handler may have marked its row done; the job decides
            current = conn.execute(select(_jobs.c.status).where(_jobs.c.id == job_id)).scalar_one_or_none()
            if current is not None and JobStatus(current) is not JobStatus.RUNNING:
                follow_jobs(conn, [job_id], JobStatus(current))
    return n == 1


def fail(
    db: Db,
    job_id: int,
    traceback: str,
    *,
    worker_id: str | None = None,
    permanent: bool = False,
    retry_delay_s: float = 0.0,
) -> JobStatus | None:
    """Record a failed attempt: back to ``todo`` while attempts remain, else ``failed``.

    ``permanent`` fails at once (unknown kind, invalid payload: retrying cannot help). Returns the
    new status, or None when the job was not running (cancelled meanwhile, or not ours).
    """
    now = utcnow()
    cond = _running(job_id, worker_id)
    retry_left = false() if permanent else _jobs.c.attempts < _jobs.c.max_attempts
    new_status = case((retry_left, JobStatus.TODO.value), else_=JobStatus.FAILED.value)
    with _tx(db) as conn:
        row = conn.execute(
            update(_jobs)
            .where(*cond)
            .values(
                status=new_status,
                error=traceback,
                locked_by=None,
                locked_until=None,
                run_after=case((retry_left, now + timedelta(seconds=retry_delay_s)), else_=_jobs.c.run_after),
                finished=case((retry_left, None), else_=now),
            )
            .returning(_jobs.c.status)
        ).first()
        if row is None:
            return None
        status = JobStatus(row[0])
        follow_jobs(conn, [job_id], status, traceback.strip().splitlines()[-1] if traceback.strip() else None)
        if status is JobStatus.FAILED:
            _fail_dependents(conn)
        else:
            _notify(conn, "retry")
    log.info("Job %s failed; now %s", job_id, status.value)
    return status


def release(db: Db, job_id: int, worker_id: str | None = None) -> bool:
    """Give a running job back (clean shutdown): ``todo`` again, without counting the attempt."""
    cond = _running(job_id, worker_id)
    with _tx(db) as conn:
        n = conn.execute(
            update(_jobs)
            .where(*cond)
            .values(
                status=JobStatus.TODO,
                attempts=case((_jobs.c.attempts > 0, _jobs.c.attempts - 1), else_=0),
                locked_by=None,
                locked_until=None,
                started=None,
            )
        ).rowcount
        if n:
            follow_jobs(conn, [job_id], JobStatus.TODO)
            _notify(conn, "release")
    return n == 1


def cancel(db: Db, job_id: int) -> bool:
    """Cancel a waiting or running job; a running handler sees it through ``is_cancelled``.

    Returns False when the job had already finished. Its ``todo`` dependents fail.
    """
    with _tx(db) as conn:
        n = conn.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id, _jobs.c.status.in_([JobStatus.TODO, JobStatus.RUNNING]))
            .values(status=JobStatus.CANCELLED, finished=utcnow(), locked_until=None)
        ).rowcount
        if n:
            follow_jobs(conn, [job_id], JobStatus.CANCELLED)
            _fail_dependents(conn)
    return n == 1


def is_cancelled(db: Db, job_id: int) -> bool:
    """Whether a user cancelled the job (handlers poll this between steps)."""
    with _tx(db) as conn:
        status = conn.execute(select(_jobs.c.status).where(_jobs.c.id == job_id)).scalar_one_or_none()
    return status == JobStatus.CANCELLED


def retry(db: Db, job_id: int) -> bool:
    """Put a failed or cancelled job back to ``todo`` with fresh attempts (and its dependents).

    Dependents that failed only because of this job come back too, so retrying the failed step
    of a pipeline resumes the pipeline. Returns False when the job was not failed or cancelled.
    """
    with _tx(db) as conn:
        n = _retry_one(conn, job_id)
        if n:
            pending = [job_id]
            while pending:
                parent = pending.pop()
                children = conn.execute(
                    select(_jobs.c.id).where(
                        _jobs.c.depends_on == parent,
                        _jobs.c.status == JobStatus.FAILED,
                        _jobs.c.error.startswith(DEPENDENCY_FAILED),
                    )
                ).scalars()
                for child in list(children):
                    _retry_one(conn, child)
                    pending.append(child)
            _notify(conn, "retry")
    return n == 1


def _retry_one(conn: Connection | Session, job_id: int) -> int:
    follow_jobs(conn, select(_jobs.c.id).where(_jobs.c.id == job_id,
                                              _jobs.c.status.in_([JobStatus.FAILED, JobStatus.CANCELLED])),
                JobStatus.TODO)
    return conn.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status.in_([JobStatus.FAILED, JobStatus.CANCELLED]))
        .values(
            status=JobStatus.TODO,
            attempts=0,
            locked_by=None,
            locked_until=None,
            run_after=None,
            started=None,
            finished=None,
        )
    ).rowcount


def get_job(db: Db, job_id: int) -> JobRecord | None:
    """The job's current row, or None."""
    with _tx(db) as conn:
        row = conn.execute(select(*_returning_cols()).where(_jobs.c.id == job_id)).first()
    return None if row is None else JobRecord.from_row(row)


def has_claimable(db: Db, kinds: Sequence[str] | None = None, exclude_kinds: Sequence[str] | None = None) -> bool:
    """Whether ``claim_job`` would find something now (the SQLite wait loop polls this)."""
    if kinds is not None and not kinds:
        return False
    with _tx(db) as conn:
        return conn.execute(
            select(exists().where(_claimable(_jobs, utcnow(), kinds, exclude_kinds)))
        ).scalar_one()


# ------------------------------------------------------------------------------------------ waiting


class JobListener:
    """Wakes a waiting worker when a job may have become claimable.

    Postgres: a dedicated autocommit connection LISTENs on ``CHANNEL``; notifications that arrive
    while the worker is busy queue up and end the next wait at once. SQLite: polls
    ``has_claimable`` every ``POLL_INTERVAL_S``. Either way a wait also ends on ``stop``.
    When the LISTEN connection breaks (a database restart) the listener says so by returning True
    (look at the queue now) and connects again at the next wait; until then it sleeps instead.
    """

    def __init__(self, engine: Engine, kinds: Sequence[str] | None = None,
                 exclude_kinds: Sequence[str] | None = None) -> None:
        self.engine = engine
        self.kinds = kinds
        self.exclude_kinds = exclude_kinds
        self._pg: Any = None
        self._postgres = engine.dialect.name == "postgresql"
        if self._postgres:
            self._connect()

    def _connect(self) -> bool:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            self._pg = psycopg.connect(url, autocommit=True, connect_timeout=5)
            self._pg.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            log.debug("LISTEN connection failed: %s", exc)
            self._drop()
            return False
        return True

    def _drop(self) -> None:
        if self._pg is not None:
            try:
                self._pg.close()
            except Exception:  # noqa: BLE001 (closing a broken connection)
                pass
            self._pg = None

    def wait(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Block up to ``timeout`` seconds; True when woken by a job (or a claimable one exists)."""
        import_error: type[Exception] = Exception
        if self._postgres:
            import psycopg

            import_error = psycopg.Error
            if self._pg is None and self._connect():
                return True  # back after an outage: jobs may have been queued meanwhile
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                return False
            if self._pg is not None:
                try:
                    for _ in self._pg.notifies(timeout=min(remaining, 1.0), stop_after=1):
                        return True
                except import_error as exc:
                    log.warning("The LISTEN connection broke (%s); listening again at the next wait",
                                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
                    self._drop()
                    return True
                continue
            step = min(remaining, POLL_INTERVAL_S)
            if not self._postgres and has_claimable(self.engine, self.kinds, self.exclude_kinds):
                return True
            if stop is not None:
                stop.wait(step)
            else:
                time.sleep(step)

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> JobListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_job(
    engine: Engine,
    timeout: float,
    *,
    kinds: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """One-off wait for a job (LISTEN on Postgres, short polling on SQLite); see ``JobListener``."""
    if has_claimable(engine, kinds, exclude_kinds):
        return True
    with JobListener(engine, kinds, exclude_kinds) as listener:
        return listener.wait(timeout, stop)


# ------------------------------------------------------------------------------------------ workers


def describe_kinds(kinds: Sequence[str] | None, exclude_kinds: Sequence[str] | None = None) -> str | None:
    """What a worker claims, for people: ``"ablate, lens"``, ``"all but ablate, lens"``, or None (everything)."""
    if kinds is not None:
        return ", ".join(kinds)
    return f"all but {', '.join(exclude_kinds)}" if exclude_kinds else None


def register_worker(
    db: Db,
    worker_id: str,
    hostname: str,
    pid: int,
    *,
    kinds: str | None = None,
    restarts: int = 0,
    note: str | None = None,
) -> None:
    """Record a live worker (replacing a stale row with the same id: a supervised worker's restart)."""
    now = utcnow()
    with _tx(db) as conn:
        conn.execute(delete(_workers).where(_workers.c.id == worker_id))
        conn.execute(
            insert(_workers).values(id=worker_id, hostname=hostname, pid=pid, started=now, heartbeat_at=now,
                                    kinds=kinds, restarts=restarts, note=(note or None) and note[:500])
        )


def worker_stopped(db: Db, worker_id: str, note: str) -> None:
    """Mark a worker's process as down (the supervisor saw it exit) with the reason; shown on the jobs page."""
    with _tx(db) as conn:
        conn.execute(update(_workers).where(_workers.c.id == worker_id).values(stopped=utcnow(), note=note[:500]))


def fail_worker_jobs(db: Db, worker_id: str, reason: str) -> list[int]:
    """Fail the attempt of every job a dead worker held (its supervisor saw the process exit), at once rather
    than when the lease lapses; each is retried while attempts remain. Returns the job ids."""
    with _tx(db) as conn:
        held = conn.execute(
            select(_jobs.c.id).where(_jobs.c.status == JobStatus.RUNNING, _jobs.c.locked_by == worker_id)
        ).scalars().all()
    for job_id in held:
        fail(db, job_id, reason, worker_id=worker_id)
    return list(held)


def worker_heartbeat(db: Db, worker_id: str) -> None:
    with _tx(db) as conn:
        conn.execute(update(_workers).where(_workers.c.id == worker_id).values(heartbeat_at=utcnow()))


def unregister_worker(db: Db, worker_id: str) -> None:
    with _tx(db) as conn:
        conn.execute(delete(_workers).where(_workers.c.id == worker_id))


def prune_workers(db: Db, older_than_s: float) -> int:
    """Delete workers silent for ``older_than_s`` seconds (their jobs are re-claimed by lease)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with _tx(db) as conn:
        return conn.execute(delete(_workers).where(_workers.c.heartbeat_at < cutoff)).rowcount


__all__ = [
    "CHANNEL",
    "DEFAULT_LEASE_S",
    "DEPENDENCY_FAILED",
    "INTERACTIVE_KINDS",
    "JobListener",
    "JobRecord",
    "JobStatus",
    "cancel",
    "claim_job",
    "complete",
    "describe_kinds",
    "enqueue",
    "fail",
    "fail_worker_jobs",
    "get_job",
    "has_claimable",
    "heartbeat",
    "is_cancelled",
    "prune_workers",
    "reap",
    "register_worker",
    "release",
    "retry",
    "set_progress",
    "unregister_worker",
    "wait_for_job",
    "worker_heartbeat",
    "worker_stopped",
]
