"""The job queue as people see it: what waits, what runs (with progress), what failed and why."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.db.schema import Job, JobStatus, Worker, utcnow

WORKER_ALIVE_S = 120  # seconds since the last heartbeat for a worker to count as alive
FINISHED_SHOWN = 50  # finished jobs listed (the newest)


class JobView(BaseModel):
    id: int
    kind: str
    status: str
    priority: int
    attempts: int
    max_attempts: int
    run_id: int | None
    depends_on: int | None
    progress: dict[str, Any] | None
    step: float | None = Field(None, description="Steps done (progress.done).")
    total: float | None = Field(None, description="Steps in all, when the job knows its length.")
    percent: float | None
    elapsed_s: float | None = Field(None, description="Seconds since the job started (running) or its run time.")
    eta_s: float | None = Field(None, description="Seconds left at the rate so far (running jobs with a total).")
    error: str | None
    error_line: str | None
    locked_by: str | None
    created: datetime | None
    started: datetime | None
    finished: datetime | None
    can_retry: bool
    can_cancel: bool


class WorkerView(BaseModel):
    id: str
    hostname: str
    pid: int
    heartbeat_at: datetime | None
    alive: bool


class JobsPage(BaseModel):
    running: list[JobView]
    waiting: list[JobView]
    failed: list[JobView]
    finished: list[JobView]
    counts: dict[str, int]
    workers: list[WorkerView]


def job_view(j: Job, now: datetime | None = None) -> JobView:
    status = j.status.value if hasattr(j.status, "value") else str(j.status)
    p = j.progress or {}
    done = p.get("done") if isinstance(p.get("done"), int | float) else None
    total = p.get("total") if isinstance(p.get("total"), int | float) and p.get("total") else None
    percent = min(100.0, 100.0 * float(done) / float(total)) if done is not None and total else None
    if status == "succeeded" and total:
        percent = 100.0
    now = now or utcnow()
    elapsed = eta = None
    if j.started is not None:
        end = j.finished if j.finished is not None and status not in ("running", "todo") else now
        elapsed = max(0.0, (end - j.started).total_seconds())
    if status == "running" and elapsed is not None and done and total and done < total:
        eta = elapsed * (float(total) - float(done)) / float(done)  # the rate so far, start-up included
    error_line = None
    if j.error:
        lines = [ln for ln in j.error.strip().splitlines() if ln.strip()]
        error_line = lines[-1] if lines else None
    return JobView(
        id=j.id, kind=j.kind, status=status, priority=j.priority, attempts=j.attempts, max_attempts=j.max_attempts,
        run_id=j.run_id, depends_on=j.depends_on, progress=j.progress, step=done, total=total, percent=percent,
        elapsed_s=elapsed, eta_s=eta, error=j.error,
        error_line=error_line, locked_by=j.locked_by, created=j.created, started=j.started, finished=j.finished,
        can_retry=status in ("failed", "cancelled"), can_cancel=status in ("todo", "running"),
    )


def jobs_page(session: Session) -> JobsPage:
    active = session.scalars(select(Job).where(Job.status.in_([JobStatus.TODO, JobStatus.RUNNING]))
                             .order_by(Job.priority.desc(), Job.id).limit(500)).all()
    failed = session.scalars(select(Job).where(Job.status.in_([JobStatus.FAILED, JobStatus.CANCELLED]))
                             .order_by(Job.id.desc()).limit(200)).all()
    finished = session.scalars(select(Job).where(Job.status == JobStatus.SUCCEEDED)
                               .order_by(Job.id.desc()).limit(FINISHED_SHOWN)).all()
    counts = {(s.value if hasattr(s, "value") else str(s)): n for s, n in session.execute(
        select(Job.status, func.count()).group_by(Job.status))}
    cutoff = utcnow() - timedelta(seconds=WORKER_ALIVE_S)
    workers = [
        WorkerView(id=w.id, hostname=w.hostname, pid=w.pid, heartbeat_at=w.heartbeat_at,
                   alive=bool(w.heartbeat_at and w.heartbeat_at >= cutoff))
        for w in session.scalars(select(Worker).order_by(
            case((Worker.heartbeat_at >= cutoff, 0), else_=1), Worker.id))
    ]
    views = [job_view(j) for j in active]
    return JobsPage(
        running=[v for v in views if v.status == "running"], waiting=[v for v in views if v.status == "todo"],
        failed=[job_view(j) for j in failed], finished=[job_view(j) for j in finished], counts=counts,
        workers=workers,
    )
