"""The index (redirects to the latest run) and the run overview."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import RedirectResponse, Response

from app.web.data.runs import IndexPage, RunPage, index_page, run_page
from app.web.data.sets import SetPage, set_page
from app.web.deps import SessionDep
from app.web.render import ablate_limit, render

router = APIRouter(tags=["runs"])

SetId = Annotated[int, Path(ge=1, description="Feature set id.")]
Labels = Annotated[str | None, Query(max_length=200, description="Which labeler's categories to show (builtin or an "
                                     "LLM's model name; default: the one that labelled last).")]


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
def run_html(request: Request, run: str, session: SessionDep, labels: Labels = None) -> Response:
    return render(request, "run.html", run_page(session, run, labels), limit=ablate_limit(request))


@router.get("/api/runs/{run}", response_model=RunPage, name="api_run", summary="A run's overview")
def run_api(run: str, session: SessionDep, labels: Labels = None) -> RunPage:
    return run_page(session, run, labels)


@router.get("/runs/{run}/sets/{set_id}", include_in_schema=False, name="feature_set_page")
def set_html(request: Request, run: str, set_id: SetId, session: SessionDep) -> Response:
    return render(request, "feature_set.html", set_page(session, run, set_id), limit=ablate_limit(request))


@router.get("/api/runs/{run}/sets/{set_id}", response_model=SetPage, name="api_feature_set",
            summary="A feature set: its members with roles and the study that chose it")
def set_api(run: str, set_id: SetId, session: SessionDep) -> SetPage:
    return set_page(session, run, set_id)
