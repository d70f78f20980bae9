"""Stored traces: the list and one trace (hesitations outlined, lens shading, minimap), with JSON twins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel

from app.web.data.common import MAX_ID, get_run
from app.web.data.traces import (
    Shade,
    TraceList,
    TracePage,
    WhyPage,
    queue_why,
    trace_list,
    trace_page,
    why_page,
)
from app.web.deps import SessionDep
from app.web.render import render

router = APIRouter(tags=["traces"])

TraceId = Annotated[int, Path(ge=1, le=MAX_ID, description="Trace (stored prompt) id.")]
ShadeQ = Annotated[Shade, Query(description="Shade tokens by KL(target‖hybrid), KL(target‖adapted), a feature, or not.")]
Pos = Annotated[int, Path(ge=0, le=MAX_ID, description="Token position in the trace (0-based).")]
FeatureQ = Annotated[str | None, Query(max_length=40, description="Shade by this feature's activation: layer/index.")]


@router.get("/runs/{run}/traces", include_in_schema=False, name="traces_page")
def traces_html(request: Request, run: str, session: SessionDep) -> Response:
    return render(request, "traces.html", trace_list(session, run))


@router.get("/api/runs/{run}/traces", response_model=TraceList, name="api_traces",
            summary="A run's stored prompts and traces (newest first)")
def traces_api(run: str, session: SessionDep) -> TraceList:
    return trace_list(session, run)


@router.get("/runs/{run}/traces/{trace_id}", include_in_schema=False, name="trace_page")
def trace_html(request: Request, run: str, trace_id: TraceId, session: SessionDep, shade: ShadeQ = "kl-hybrid",
               feature: FeatureQ = None) -> Response:
    return render(request, "trace.html", trace_page(session, run, trace_id, shade=shade, feature=feature))


@router.get("/api/runs/{run}/traces/{trace_id}", response_model=TracePage, name="api_trace",
            summary="A stored trace: tokens, hesitation marks, regions and shading from the diff lens of its ids")
def trace_api(run: str, trace_id: TraceId, session: SessionDep, shade: ShadeQ = "kl-hybrid",
              feature: FeatureQ = None) -> TracePage:
    return trace_page(session, run, trace_id, shade=shade, feature=feature)


class WhyQueued(BaseModel):
    job_id: int
    status_url: str
    why_url: str


@router.get("/runs/{run}/traces/{trace_id}/why/{pos}", include_in_schema=False, name="trace_why")
def why_html(request: Request, run: str, trace_id: TraceId, pos: Pos, session: SessionDep) -> Response:
    """The attribution graph of this token if one is stored (a redirect), else its queued job or a queue button."""
    page = why_page(session, run, trace_id, pos)
    if page.graph_id is not None:
        return RedirectResponse(request.app.url_path_for("graph_page", run=str(page.run.id),
                                                         graph_id=str(page.graph_id)), status_code=303)
    return render(request, "trace_why.html", page)


@router.post("/runs/{run}/traces/{trace_id}/why/{pos}", include_in_schema=False, name="trace_why_queue")
def why_queue_html(request: Request, run: str, trace_id: TraceId, pos: Pos, session: SessionDep) -> Response:
    queue_why(session, run, trace_id, pos)
    session.commit()
    url = request.app.url_path_for("trace_why", run=str(get_run(session, run).id), trace_id=str(trace_id),
                                   pos=str(pos))
    return RedirectResponse(url, status_code=303)


@router.get("/api/runs/{run}/traces/{trace_id}/why/{pos}", response_model=WhyPage, name="api_trace_why",
            summary="The stored attribution graph of one token of a trace (same token ids), or its queued job")
def why_api(run: str, trace_id: TraceId, pos: Pos, session: SessionDep) -> WhyPage:
    return why_page(session, run, trace_id, pos)


@router.post("/api/runs/{run}/traces/{trace_id}/why/{pos}", response_model=WhyQueued, status_code=202,
             name="api_trace_why_queue",
             summary="Queue an attribute job explaining this token from the tokens before it")
def why_queue_api(request: Request, run: str, trace_id: TraceId, pos: Pos, session: SessionDep) -> WhyQueued:
    job_id = queue_why(session, run, trace_id, pos)
    session.commit()
    run_id = str(get_run(session, run).id)
    return WhyQueued(job_id=job_id,
                     status_url=str(request.app.url_path_for("api_graph_job", run=run_id, job_id=str(job_id))),
                     why_url=str(request.app.url_path_for("trace_why", run=run_id, trace_id=str(trace_id),
                                                          pos=str(pos))))
