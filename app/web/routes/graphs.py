"""The attribution-graph page and the circuit-tracer JSON download."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response

from app.web.data.graphs import GraphPage, circuit_tracer_json, graph_page
from app.web.deps import SessionDep
from app.web.render import ablate_limit, render

router = APIRouter(tags=["graphs"])

GraphId = Annotated[int, Path(ge=1, description="Graph id.")]


@router.get("/runs/{run}/graphs/{graph_id}", include_in_schema=False, name="graph_page")
def graph_html(request: Request, run: str, graph_id: GraphId, session: SessionDep) -> Response:
    page = graph_page(session, run, graph_id)
    return render(request, "graph.html", page, graph_source=graph_ablation_source(page), limit=ablate_limit(request))


def graph_ablation_source(page: GraphPage) -> dict[str, Any]:
    """Where a graph page's ablations start: the graph's own token ids up to the position it explains (its
    stored prompt, else the ids kept with the graph), reporting its target token's probability."""
    fields: dict[str, Any] = {}
    if page.prompt_id is not None:
        fields = {"prompt_id": page.prompt_id}
        value = "prompt_id"
    else:
        fields = {"token_ids": " ".join(str(t.id) for t in page.prompt_tokens)}
        value = "token_ids"
    if page.position is not None:
        fields["prompt_tokens"] = page.position + 1
    if page.target_token_id is not None:
        fields["target_token_id"] = page.target_token_id
    return {"value": value, "label": "this graph's prompt, up to the explained position", "fields": fields,
            "preview": None}


@router.get("/api/runs/{run}/graphs/{graph_id}", response_model=GraphPage, name="api_graph",
            summary="An attribution graph with its features' roles and top tokens")
def graph_api(run: str, graph_id: GraphId, session: SessionDep) -> GraphPage:
    return graph_page(session, run, graph_id)


@router.get("/api/runs/{run}/graphs/{graph_id}/circuit-tracer.json", name="graph_download",
            summary="The graph as circuit-tracer / Neuronpedia graph JSON", response_model=dict[str, Any])
def graph_download(run: str, graph_id: GraphId, session: SessionDep) -> JSONResponse:
    data = circuit_tracer_json(session, run, graph_id)
    filename = re.sub(r"[^A-Za-z0-9._-]+", "_", data["metadata"]["slug"]) or f"graph-{graph_id}"
    return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="{filename}.json"'})
