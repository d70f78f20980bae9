"""Ablation pages, the live token partial (htmx polling) and the ablate request (form and JSON)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.web.data.ablations import (
    AblateForm,
    AblationList,
    AblationPage,
    ablation_list,
    ablation_page,
    ablation_page_head,
    ablation_state,
    cancel_ablation,
    create_ablation,
    tokens_after,
)
from app.web.data.common import BadInput, get_run
from app.web.deps import SessionDep, SettingsDep
from app.web.render import ablate_limit, graph_prompt_source, render

router = APIRouter(tags=["ablations"])

AblationId = Annotated[int, Path(ge=1, description="Ablation id.")]


class Created(BaseModel):
    id: int
    url: str


@router.get("/runs/{run}/ablations", include_in_schema=False, name="ablations_page")
def ablations_html(request: Request, run: str, session: SessionDep) -> Response:
    page = ablation_list(session, run)
    graph = graph_prompt_source(session, page.run.id)
    return render(request, "ablations.html", page, form=None, error=None, sources=[graph] if graph else [],
                  limit=ablate_limit(request))


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
        graph = graph_prompt_source(session, page.run.id)
        return render(request, "ablations.html", page, form=form, error=str(exc), status_code=exc.status_code,
                      sources=[graph] if graph else [], limit=ablate_limit(request))
    url = request.app.url_path_for("ablation_page", run=str(get_run(session, run).id), ablation_id=str(ablation_id))
    return RedirectResponse(url, status_code=303)


@router.post("/api/runs/{run}/ablations", response_model=Created, status_code=201, name="api_ablate",
             summary="Request an ablation: stores it and queues a high-priority ablate job")
def ablate_api(request: Request, run: str, form: AblateForm, session: SessionDep, settings: SettingsDep) -> Created:
    ablation_id = create_ablation(session, run, form, settings)
    run_id = get_run(session, run).id
    return Created(id=ablation_id, url=request.app.url_path_for("ablation_page", run=str(run_id),
                                                               ablation_id=str(ablation_id)))


@router.get("/runs/{run}/ablations/{ablation_id}", include_in_schema=False, name="ablation_page")
def ablation_html(request: Request, run: str, ablation_id: AblationId, session: SessionDep) -> Response:
    return render(request, "ablation.html", ablation_page(session, run, ablation_id))


@router.post("/runs/{run}/ablations/{ablation_id}/cancel", include_in_schema=False, name="ablation_cancel")
def ablation_cancel_html(request: Request, run: str, ablation_id: AblationId, session: SessionDep) -> Response:
    cancel_ablation(session, run, ablation_id)
    run_id = get_run(session, run).id
    return RedirectResponse(request.app.url_path_for("ablation_page", run=str(run_id), ablation_id=str(ablation_id)),
                            status_code=303)


class Cancelled(BaseModel):
    id: int
    changed: bool
    status: str


@router.post("/api/runs/{run}/ablations/{ablation_id}/cancel", response_model=Cancelled, name="api_ablation_cancel",
             summary="Cancel an ablation (its job stops between two tokens; what was generated stays)")
def ablation_cancel_api(run: str, ablation_id: AblationId, session: SessionDep) -> Cancelled:
    changed = cancel_ablation(session, run, ablation_id)
    status, _ = ablation_state(session, ablation_id)
    return Cancelled(id=ablation_id, changed=changed, status=status)


STREAM_POLL_S = 0.1  # seconds between looks for new tokens while streaming
STREAM_MAX_S = 900  # a stream ends after this many seconds (the page falls back to reloading)


@router.get("/runs/{run}/ablations/{ablation_id}/stream", include_in_schema=False, name="ablation_stream")
async def ablation_stream(request: Request, run: str, ablation_id: AblationId) -> StreamingResponse:
    """Server-sent events: one ``token`` event per generated token as the worker writes it, then ``done``."""
    maker = request.app.state.sessionmaker

    def check() -> None:
        with maker() as s:
            ablation_page_head(s, run, ablation_id)  # 404 for a wrong run or id, before streaming starts

    def poll(seen: dict[str, int]) -> tuple[list[dict], str, bool]:
        with maker() as s:
            new = tokens_after(s, ablation_id, seen)
            status, done = ablation_state(s, ablation_id)
        return new, status, done

    await run_in_threadpool(check)

    async def events():
        seen: dict[str, int] = {}
        deadline = time.monotonic() + STREAM_MAX_S
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return
            new, status, done = await run_in_threadpool(poll, seen)
            for t in new:
                seen[t["condition"]] = t["step"]
                yield f"event: token\ndata: {json.dumps(t)}\n\n"
            if done:
                if new:  # tokens written with the final status: one more look
                    continue
                yield f"event: done\ndata: {json.dumps({'status': status})}\n\n"
                return
            await asyncio.sleep(STREAM_POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/runs/{run}/ablations/{ablation_id}/live", include_in_schema=False, name="ablation_live")
def ablation_live(request: Request, run: str, ablation_id: AblationId, session: SessionDep) -> Response:
    """The results partial; while not done it carries the htmx trigger that polls it again."""
    return render(request, "_ablation_live.html", ablation_page(session, run, ablation_id), oob=True)


@router.get("/api/runs/{run}/ablations/{ablation_id}", response_model=AblationPage, name="api_ablation",
            summary="An ablation: tokens per condition, divergence, per-token KL, status")
def ablation_api(run: str, ablation_id: AblationId, session: SessionDep) -> AblationPage:
    return ablation_page(session, run, ablation_id)
