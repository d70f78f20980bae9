"""Ablation pages, the live token partial (htmx polling) and the ablate request (form and JSON)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel

from app.web.data.ablations import (
    AblateForm,
    AblationList,
    AblationPage,
    ablation_list,
    ablation_page,
    create_ablation,
)
from app.web.data.common import MAX_ID, BadInput, get_run
from app.web.deps import SessionDep, SettingsDep
from app.web.errors import QUEUE_FULL, WRITE_ERRORS
from app.web.render import default_prompt, render

router = APIRouter(tags=["ablations"])

AblationId = Annotated[int, Path(ge=1, le=MAX_ID, description="Ablation id.")]


class Created(BaseModel):
    id: int
    url: str


@router.get("/runs/{run}/ablations", include_in_schema=False, name="ablations_page")
def ablations_html(request: Request, run: str, session: SessionDep) -> Response:
    page = ablation_list(session, run)
    form = AblateForm.model_construct(prompt=default_prompt(session, page.run.id), features="", mode="zero",
                                      value=None, positions="all", max_new_tokens=64, compare=[])
    return render(request, "ablations.html", page, form=form, error=None)


@router.get("/api/runs/{run}/ablations", response_model=AblationList, name="api_ablations",
            summary="A run's ablation requests (newest first)")
def ablations_api(run: str, session: SessionDep) -> AblationList:
    return ablation_list(session, run)


@router.post("/runs/{run}/ablations", include_in_schema=False, name="ablate")
def ablate_html(request: Request, run: str, form: Annotated[AblateForm, Form()], session: SessionDep,
                settings: SettingsDep) -> Response:
    """Create and redirect to the ablation; a refused request re-shows the form with the reason (4xx)."""
    try:
        ablation_id = create_ablation(session, run, form, settings)
    except BadInput as exc:
        page = ablation_list(session, run)
        response = render(request, "ablations.html", page, form=form, error=str(exc), status_code=exc.status_code)
        response.headers.update(exc.headers or {})
        return response
    url = request.app.url_path_for("ablation_page", run=str(get_run(session, run).id), ablation_id=str(ablation_id))
    return RedirectResponse(url, status_code=303)


@router.post("/api/runs/{run}/ablations", response_model=Created, status_code=201, name="api_ablate",
             responses={**WRITE_ERRORS, **QUEUE_FULL},
             summary="Request an ablation: stores it and queues a high-priority ablate job")
def ablate_api(request: Request, run: str, form: AblateForm, session: SessionDep, settings: SettingsDep) -> Created:
    ablation_id = create_ablation(session, run, form, settings)
    run_id = get_run(session, run).id
    return Created(id=ablation_id, url=request.app.url_path_for("ablation_page", run=str(run_id),
                                                               ablation_id=str(ablation_id)))


@router.get("/runs/{run}/ablations/{ablation_id}", include_in_schema=False, name="ablation_page")
def ablation_html(request: Request, run: str, ablation_id: AblationId, session: SessionDep) -> Response:
    return render(request, "ablation.html", ablation_page(session, run, ablation_id))


@router.get("/runs/{run}/ablations/{ablation_id}/live", include_in_schema=False, name="ablation_live")
def ablation_live(request: Request, run: str, ablation_id: AblationId, session: SessionDep) -> Response:
    """The results partial; while not done it carries the htmx trigger that polls it again."""
    return render(request, "_ablation_live.html", ablation_page(session, run, ablation_id), oob=True)


@router.get("/api/runs/{run}/ablations/{ablation_id}", response_model=AblationPage, name="api_ablation",
            summary="An ablation: tokens per condition, divergence, per-token KL, status")
def ablation_api(run: str, ablation_id: AblationId, session: SessionDep) -> AblationPage:
    return ablation_page(session, run, ablation_id)
