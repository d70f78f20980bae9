"""Experiments: the list with its form, the experiment page (refreshing while it runs), submit and cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel

from app.web.data.common import BadInput, get_run
from app.web.data.experiments import (
    ExperimentForm,
    ExperimentPage,
    cancel_experiment,
    create_experiment,
    experiment_choices,
    experiment_page,
)
from app.web.data.runs import experiment_items
from app.web.deps import SessionDep, SettingsDep
from app.web.render import ablate_limit, render

router = APIRouter(tags=["experiments"])

ExperimentId = Annotated[int, Path(ge=1, description="Experiment id.")]


class Created(BaseModel):
    id: int
    url: str


class Cancelled(BaseModel):
    id: int
    changed: bool
    status: str


def _list_page(request: Request, session, run: str, *, form: ExperimentForm | None = None, error: str | None = None,
               status_code: int = 200, feature_set: str | None = None) -> Response:
    r = get_run(session, run)
    return render(request, "experiments.html", None, run=r, experiments=experiment_items(session, r.id),
                  choices=experiment_choices(session, r), form=form, error=error, limit=ablate_limit(request),
                  status_code=status_code, feature_set=feature_set)


@router.get("/runs/{run}/experiments", include_in_schema=False, name="experiments_page")
def experiments_html(request: Request, run: str, session: SessionDep,
                     feature_set: Annotated[str | None, Query(max_length=200)] = None) -> Response:
    """The experiments of a run and the form (``feature_set`` preselects a set)."""
    return _list_page(request, session, run, feature_set=feature_set)


@router.post("/runs/{run}/experiments", include_in_schema=False, name="experiment_submit")
def experiment_submit_html(request: Request, run: str, form: Annotated[ExperimentForm, Form()], session: SessionDep,
                           settings: SettingsDep) -> Response:
    try:
        experiment_id = create_experiment(session, run, form, settings)
    except BadInput as exc:
        return _list_page(request, session, run, form=form, error=str(exc), status_code=exc.status_code)
    url = request.app.url_path_for("experiment_page", run=str(get_run(session, run).id), experiment_id=str(experiment_id))
    return RedirectResponse(url, status_code=303)


@router.post("/api/runs/{run}/experiments", response_model=Created, status_code=201, name="api_experiment_submit",
             summary="Request an experiment: the intervention over a prompt set, queued as a batch job")
def experiment_submit_api(request: Request, run: str, form: ExperimentForm, session: SessionDep,
                          settings: SettingsDep) -> Created:
    experiment_id = create_experiment(session, run, form, settings)
    run_id = get_run(session, run).id
    return Created(id=experiment_id, url=request.app.url_path_for("experiment_page", run=str(run_id),
                                                                  experiment_id=str(experiment_id)))


@router.get("/runs/{run}/experiments/{experiment_id}", include_in_schema=False, name="experiment_page")
def experiment_html(request: Request, run: str, experiment_id: ExperimentId, session: SessionDep) -> Response:
    return render(request, "experiment.html", experiment_page(session, run, experiment_id))


@router.get("/api/runs/{run}/experiments/{experiment_id}", response_model=ExperimentPage, name="api_experiment",
            summary="An experiment: per-condition distributions and per-prompt rows, progress while it runs")
def experiment_api(run: str, experiment_id: ExperimentId, session: SessionDep) -> ExperimentPage:
    return experiment_page(session, run, experiment_id)


@router.post("/runs/{run}/experiments/{experiment_id}/cancel", include_in_schema=False, name="experiment_cancel")
def experiment_cancel_html(request: Request, run: str, experiment_id: ExperimentId, session: SessionDep) -> Response:
    cancel_experiment(session, run, experiment_id)
    url = request.app.url_path_for("experiment_page", run=str(get_run(session, run).id), experiment_id=str(experiment_id))
    return RedirectResponse(url, status_code=303)


@router.post("/api/runs/{run}/experiments/{experiment_id}/cancel", response_model=Cancelled,
             name="api_experiment_cancel", summary="Cancel an experiment (the worker stops between batches)")
def experiment_cancel_api(run: str, experiment_id: ExperimentId, session: SessionDep) -> Cancelled:
    changed = cancel_experiment(session, run, experiment_id)
    page = experiment_page(session, run, experiment_id)
    return Cancelled(id=experiment_id, changed=changed, status=page.status)
