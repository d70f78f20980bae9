"""The diff lens: the form and list, one lens (token strip, position panel, feature table), JSON twins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel

from app.web.data.ablations import parse_features
from app.web.data.common import MAX_ID, BadInput, get_run
from app.web.data.lens import (
    TABLE_SORTS,
    KlChoice,
    LensForm,
    LensList,
    LensPage,
    Position,
    TableSort,
    create_lens,
    lens_list,
    lens_page,
    lens_position,
)
from app.web.deps import SessionDep, SettingsDep
from app.web.errors import QUEUE_FULL, WRITE_ERRORS
from app.web.render import render

router = APIRouter(tags=["lens"])

LensId = Annotated[int, Path(ge=1, le=MAX_ID, description="Lens id.")]
Pos = Annotated[int | None, Query(ge=0, le=MAX_ID, description="The token position whose panel is shown.")]
Kl = Annotated[KlChoice, Query(description="Shade the strip by KL(target‖hybrid) or KL(target‖adapted).")]
Sort = Annotated[TableSort, Query(description="Order of the feature table.")]


class Created(BaseModel):
    id: int
    url: str


def _list(request: Request, session, run: str, *, form: LensForm | None = None, error: str | None = None,
          status_code: int = 200) -> Response:
    response = render(request, "lens_list.html", lens_list(session, run), form=form, error=error,
                      status_code=status_code)
    return response


@router.get("/runs/{run}/lens", include_in_schema=False, name="lens_form_page")
def lens_list_html(request: Request, run: str, session: SessionDep) -> Response:
    return _list(request, session, run)


@router.get("/api/runs/{run}/lens", response_model=LensList, name="api_lens_list",
            summary="A run's diff lens requests (newest first)")
def lens_list_api(run: str, session: SessionDep) -> LensList:
    return lens_list(session, run)


@router.post("/runs/{run}/lens", include_in_schema=False, name="lens_submit")
def lens_submit_html(request: Request, run: str, form: Annotated[LensForm, Form()], session: SessionDep,
                     settings: SettingsDep) -> Response:
    """Create (or find) the lens and redirect to it, or to the feature page it was asked from (``back=feature``)."""
    try:
        lens_id = create_lens(session, run, form, settings)
    except BadInput as exc:
        response = _list(request, session, run, form=form, error=str(exc), status_code=exc.status_code)
        response.headers.update(exc.headers or {})
        return response
    run_id = str(get_run(session, run).id)
    watched = parse_features(form.features, required=False)
    if form.back == "trace" and form.trace_id is not None:  # back to the trace, shaded by the watched feature
        url = request.app.url_path_for("trace_page", run=run_id, trace_id=str(form.trace_id))
        return RedirectResponse(f"{url}?feature={watched[0][0]}/{watched[0][1]}" if watched else url, status_code=303)
    if form.back == "feature" and watched:
        layer, index = watched[0]
        url = request.app.url_path_for("feature_page", run=run_id, layer=str(layer), index=str(index))
        return RedirectResponse(f"{url}?lens={lens_id}#test-text", status_code=303)
    return RedirectResponse(request.app.url_path_for("lens_page", run=run_id, lens_id=str(lens_id)), status_code=303)


@router.post("/api/runs/{run}/lens", response_model=Created, status_code=201, name="api_lens_submit",
             responses={**WRITE_ERRORS, **QUEUE_FULL},
             summary="Request a diff lens of a text (or returns the stored identical request): an interactive job")
def lens_submit_api(request: Request, run: str, form: LensForm, session: SessionDep, settings: SettingsDep) -> Created:
    lens_id = create_lens(session, run, form, settings)
    run_id = get_run(session, run).id
    return Created(id=lens_id, url=request.app.url_path_for("lens_page", run=str(run_id), lens_id=str(lens_id)))


@router.get("/runs/{run}/lens/{lens_id}", include_in_schema=False, name="lens_page")
def lens_html(request: Request, run: str, lens_id: LensId, session: SessionDep, pos: Pos = None,
              kl: Kl = "hybrid", sort: Sort = "act") -> Response:
    return render(request, "lens.html", lens_page(session, run, lens_id, kl=kl, pos=pos, sort=sort),
                  sorts=TABLE_SORTS)


@router.get("/runs/{run}/lens/{lens_id}/pos/{pos}", include_in_schema=False, name="lens_panel")
def lens_panel_html(request: Request, run: str, lens_id: LensId, pos: Annotated[int, Path(ge=0, le=MAX_ID)],
                    session: SessionDep) -> Response:
    """The position panel alone (the strip's tokens swap it in with htmx)."""
    page = lens_page(session, run, lens_id, pos=pos)
    return render(request, "_lens_panel.html", page, p=page.selected)


@router.get("/api/runs/{run}/lens/{lens_id}", response_model=LensPage, name="api_lens",
            summary="A diff lens: per token KL(target‖hybrid), KL(target‖adapted), top tokens, features by effect")
def lens_api(run: str, lens_id: LensId, session: SessionDep, kl: Kl = "hybrid", sort: Sort = "act") -> LensPage:
    return lens_page(session, run, lens_id, kl=kl, sort=sort, all_positions=True)


@router.get("/api/runs/{run}/lens/{lens_id}/pos/{pos}", response_model=Position, name="api_lens_position",
            summary="One position of a diff lens")
def lens_position_api(run: str, lens_id: LensId, pos: Annotated[int, Path(ge=0, le=MAX_ID)],
                      session: SessionDep) -> Position:
    return lens_position(session, run, lens_id, pos)
