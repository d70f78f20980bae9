"""Stored traces: the list and one trace (hesitations outlined, lens shading, minimap), with JSON twins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.web.data.common import MAX_ID
from app.web.data.traces import Shade, TraceList, TracePage, trace_list, trace_page
from app.web.deps import SessionDep
from app.web.render import render

router = APIRouter(tags=["traces"])

TraceId = Annotated[int, Path(ge=1, le=MAX_ID, description="Trace (stored prompt) id.")]
ShadeQ = Annotated[Shade, Query(description="Shade tokens by KL(target‖hybrid), KL(target‖adapted), a feature, or not.")]
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
