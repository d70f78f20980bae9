"""The experiment page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from app.web.data.common import MAX_ID
from app.web.data.experiments import ExperimentPage, experiment_page
from app.web.deps import SessionDep
from app.web.render import render

router = APIRouter(tags=["experiments"])

ExperimentId = Annotated[int, Path(ge=1, le=MAX_ID, description="Experiment id.")]


@router.get("/runs/{run}/experiments/{experiment_id}", include_in_schema=False, name="experiment_page")
def experiment_html(request: Request, run: str, experiment_id: ExperimentId, session: SessionDep) -> Response:
    return render(request, "experiment.html", experiment_page(session, run, experiment_id))


@router.get("/api/runs/{run}/experiments/{experiment_id}", response_model=ExperimentPage, name="api_experiment",
            summary="An experiment: per-condition distributions and per-prompt rows")
def experiment_api(run: str, experiment_id: ExperimentId, session: SessionDep) -> ExperimentPage:
    return experiment_page(session, run, experiment_id)
