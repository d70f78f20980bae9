"""The index (redirects to the latest run) and the run overview."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from app.web.data.runs import IndexPage, RunPage, index_page, run_page
from app.web.deps import SessionDep
from app.web.render import render

router = APIRouter(tags=["runs"])


@router.get("/", include_in_schema=False, name="index")
def index(request: Request, session: SessionDep) -> Response:
    page = index_page(session)
    if page.latest is not None:
        return RedirectResponse(request.app.url_path_for("run_page", run=str(page.latest.id)), status_code=307)
    return render(request, "empty.html", page)


@router.get("/api/", response_model=IndexPage, name="api_index", summary="The runs (newest first)")
@router.get("/api/runs", response_model=IndexPage, name="api_runs", summary="The runs (newest first)")
def api_index(session: SessionDep) -> IndexPage:
    return index_page(session)


@router.get("/runs/{run}", include_in_schema=False, name="run_page")
def run_html(request: Request, run: str, session: SessionDep) -> Response:
    return render(request, "run.html", run_page(session, run))


@router.get("/api/runs/{run}", response_model=RunPage, name="api_run", summary="A run's overview")
def run_api(run: str, session: SessionDep) -> RunPage:
    return run_page(session, run)
