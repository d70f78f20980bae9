"""The job queue page and its retry / cancel buttons (POST, through app.db.queue)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel

from app.web.data.common import MAX_ID, NotFound
from app.web.data.jobs import JobsPage, jobs_page
from app.web.deps import SessionDep
from app.web.errors import WRITE_ERRORS
from app.web.render import render

router = APIRouter(tags=["jobs"])

JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="Job id.")]


class JobAction(BaseModel):
    id: int
    changed: bool
    status: str


@router.get("/jobs", include_in_schema=False, name="jobs_page")
def jobs_html(request: Request, session: SessionDep) -> Response:
    return render(request, "jobs.html", jobs_page(session))


@router.get("/jobs/live", include_in_schema=False, name="jobs_live")
def jobs_live(request: Request, session: SessionDep) -> Response:
    return render(request, "_jobs_live.html", jobs_page(session))


@router.get("/api/jobs", response_model=JobsPage, name="api_jobs", summary="The queue: running, waiting, failed")
def jobs_api(session: SessionDep) -> JobsPage:
    return jobs_page(session)


def _act(request: Request, job_id: int, action: str) -> JobAction:
    from app.db import queue  # named queries on the jobs table (no torch)

    engine = request.app.state.engine
    if queue.get_job(engine, job_id) is None:
        raise NotFound(f"No job {job_id}.")
    changed = queue.retry(engine, job_id) if action == "retry" else queue.cancel(engine, job_id)
    job = queue.get_job(engine, job_id)
    return JobAction(id=job_id, changed=changed, status=job.status.value if job else "unknown")


@router.post("/jobs/{job_id}/retry", include_in_schema=False, name="job_retry")
def retry_html(request: Request, job_id: JobId) -> Response:
    _act(request, job_id, "retry")
    return RedirectResponse(request.app.url_path_for("jobs_page"), status_code=303)


@router.post("/jobs/{job_id}/cancel", include_in_schema=False, name="job_cancel")
def cancel_html(request: Request, job_id: JobId) -> Response:
    _act(request, job_id, "cancel")
    return RedirectResponse(request.app.url_path_for("jobs_page"), status_code=303)


@router.post("/api/jobs/{job_id}/retry", response_model=JobAction, name="api_job_retry", responses=WRITE_ERRORS,
             summary="Put a failed or cancelled job back in the queue")
def retry_api(request: Request, job_id: JobId) -> JobAction:
    return _act(request, job_id, "retry")


@router.post("/api/jobs/{job_id}/cancel", response_model=JobAction, name="api_job_cancel", responses=WRITE_ERRORS,
             summary="Cancel a waiting or running job")
def cancel_api(request: Request, job_id: JobId) -> JobAction:
    return _act(request, job_id, "cancel")
