"""Request rows (``ablations``, ``experiments``) follow their job: one statement, in the queue's transaction.

A request row shows a person what became of their request, and its job is what the queue actually did. The
handler keeps the row up to date while it runs (running → done with a summary, failed with the error); what
happens *to* a job from outside the handler — a lease that lapsed on the last attempt, a cancel, a release
at shutdown or during a database outage, a retry, a failed attempt that will run again — is written here, in
the same transaction as the job's own change (``app.db.queue`` calls :func:`follow_jobs`), so the two can
never disagree. A job going back to ``todo`` also deletes the row's partial results (generated tokens,
per-prompt experiment rows): the re-run starts from scratch, and until it does the page shows a waiting
request, not half of an old attempt. A cancelled request keeps what it had generated.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app.db.schema import Ablation, AblationToken, Experiment, ExperimentRow, JobStatus, LensResult, utcnow

# (request table, its child table and the child's foreign key to the request, or None: results in a column)
_TABLES = (
    (Ablation.__table__, AblationToken.__table__, AblationToken.__table__.c.ablation_id),
    (Experiment.__table__, ExperimentRow.__table__, ExperimentRow.__table__.c.experiment_id),
    (LensResult.__table__, None, None),
)

ROW_STATUS = {  # job status → request row status
    JobStatus.TODO: "todo",
    JobStatus.RUNNING: "running",
    JobStatus.SUCCEEDED: "done",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}
ERROR_SHOWN = 500  # characters of a job's error copied to its request row


def follow_jobs(conn: Connection | Session, job_ids: Any, status: JobStatus, error: str | None = None) -> None:
    """Set the request rows of ``job_ids`` (a list or a SELECT of ids) to the row status of ``status``.

    ``todo`` clears the rows' results (summary, error, children); ``failed`` keeps the handler's own error
    when it wrote one, else records ``error``; ``cancelled`` keeps what was generated.
    """
    if isinstance(job_ids, list | tuple) and not job_ids:
        return
    now = utcnow()
    row_status = ROW_STATUS[status]
    for table, children, fk in _TABLES:
        mine = table.c.job_id.in_(job_ids)
        values: dict[str, Any] = {"status": row_status}
        if status is JobStatus.TODO:
            if children is not None:
                conn.execute(delete(children).where(fk.in_(select(table.c.id).where(mine))))
            else:
                values["result"] = None
            values |= {"summary": None, "error": None, "finished": None}
        elif status is JobStatus.FAILED:
            values |= {"finished": now, "error": func.coalesce(table.c.error, (error or "")[:ERROR_SHOWN])}
        elif status is JobStatus.CANCELLED:
            values |= {"finished": now}
        conn.execute(update(table).where(mine).values(**values))
