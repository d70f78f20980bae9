"""``POST /api/pipelines``: a user's model pair as a run, its pipeline queued (train → collect → evaluate →
hesitation study), the same jobs ``adapterlens pipeline --base --target --data --queue`` queues.

The API is unauthenticated: models and files must lie under the data directory or an allowed path, Hub
ids must be allowed in the settings (``app.db.pipelines``); anything else is a 403 before anything is stored.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.db.pipelines import PipelineRequest, PipelineRequestError, submit_pipeline
from app.web.data.common import BadInput
from app.web.deps import SessionDep, SettingsDep

router = APIRouter(tags=["runs"])


class PipelineQueued(BaseModel):
    run_id: int
    url: str  # the run page, which fills as the jobs finish
    jobs: dict[str, int]  # step → job id, in order


@router.post("/api/pipelines", response_model=PipelineQueued, status_code=201, name="api_pipeline",
             summary="Create a run for a model pair and queue its pipeline (train, collect, evaluate, hesitation)")
def pipeline_api(request: Request, body: PipelineRequest, session: SessionDep, settings: SettingsDep) -> PipelineQueued:
    try:
        run_id, jobs = submit_pipeline(session, body, settings)
        session.commit()
    except PipelineRequestError as exc:
        session.rollback()
        raise BadInput(str(exc), exc.status_code) from None
    return PipelineQueued(run_id=run_id, url=request.app.url_path_for("run_page", run=str(run_id)), jobs=jobs)
