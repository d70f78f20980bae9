"""The attribution-graph page and its data: the viewer's pruned view, the circuit-tracer download, new-graph
requests (an interactive ``attribute`` job), graph import, and the other exports (feature JSON, JSONL)."""

from __future__ import annotations

import gzip
import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, StrictInt, StrictStr

from app.db import queue
from app.db.attribute_request import AttributeRequestError, submit_attribute
from app.formats import FeatureFile, GraphFormatError, cantor_unpair
from app.graph_import import GraphImportError, import_graph, parse_graph_bytes
from app.web.data.common import MAX_ID, BadInput, NotFound, get_run
from app.web.data.exports import ablation_transcript, experiment_transcript, feature_file, jsonl_lines
from app.web.data.graphs import (
    GraphHeader,
    GraphPage,
    circuit_tracer_json,
    feature_cards,
    graph_header,
    graph_page,
    graph_view,
)
from app.web.deps import SessionDep
from app.web.render import ablate_limit, render

router = APIRouter(tags=["graphs"])

GraphId = Annotated[int, Path(ge=1, le=MAX_ID, description="Graph id.")]
GZIP_MIN_BYTES = 64 * 1024  # responses larger than this are gzipped for clients that accept it


def _json(request: Request, data: Any, headers: dict[str, str] | None = None) -> Response:
    """JSON, gzipped when large and accepted: a 5,000-node view is megabytes of repetitive text."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    headers = dict(headers or {})
    if len(body) > GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", ""):
        body = gzip.compress(body, compresslevel=1)  # fast: the win is the size on the wire
        headers["Content-Encoding"] = "gzip"
    headers["Vary"] = "Accept-Encoding"
    return Response(body, media_type="application/json", headers=headers)


@router.get("/runs/{run}/graphs/{graph_id}", include_in_schema=False, name="graph_page")
def graph_html(request: Request, run: str, graph_id: GraphId, session: SessionDep) -> Response:
    page = graph_header(session, run, graph_id)
    return render(request, "graph.html", page, graph_source=graph_ablation_source(page), limit=ablate_limit(request))


def graph_ablation_source(page: GraphHeader) -> dict[str, Any] | None:
    """Where a graph page's ablations start (the ablate form's source): the graph's own token ids up to the
    position it explains, reporting its target token's probability; None when the graph has no ids here."""
    a = page.ablate
    if a is None:
        return None
    fields: dict[str, Any] = {"prompt_id": a.prompt_id} if a.source == "prompt_id" else \
        {"token_ids": " ".join(str(t) for t in a.token_ids or [])}
    fields["prompt_tokens"] = a.prompt_tokens
    if a.target_token_id is not None:
        fields["target_token_id"] = a.target_token_id
    return {"value": a.source, "label": "this graph's prompt, up to the explained position", "fields": fields,
            "preview": None}


@router.get("/api/runs/{run}/graphs/{graph_id}", response_model=GraphPage, name="api_graph",
            summary="An attribution graph: header, scores, every node (with its feature's role) and link")
def graph_api(run: str, graph_id: GraphId, session: SessionDep) -> GraphPage:
    return graph_page(session, run, graph_id)


@router.get("/api/runs/{run}/graphs/{graph_id}/view", name="api_graph_view",
            summary="What the viewer draws: nodes and links as columns, pruned on the server")
def graph_view_api(
    request: Request, run: str, graph_id: GraphId, session: SessionDep,
    pruning_threshold: Annotated[float | None, Query(alias="pruningThreshold", ge=0.0, le=1.0, description=(
        "Send only feature and error nodes whose cumulative influence is at most this."))] = None,
    max_nodes: Annotated[int | None, Query(alias="maxNodes", ge=1, le=1_000_000, description=(
        "Send at most this many feature and error nodes (the most influential)."))] = None,
    keep: Annotated[str | None, Query(max_length=100_000, description="Comma-separated node ids sent whatever "
                                                                        "the cut (pinned nodes).")] = None,
) -> Response:
    from app.web.data.graphs import MAX_VIEW_NODES

    keep_ids = {k for k in (keep or "").split(",") if k}
    data = graph_view(session, run, graph_id, pruning_threshold=pruning_threshold,
                      max_nodes=max_nodes or MAX_VIEW_NODES, keep=keep_ids)
    return _json(request, data)


@router.get("/api/runs/{run}/feature-cards", name="api_feature_cards",
            summary="Mini feature cards (label, top and bottom logit tokens, frequency, role) for the graph viewer")
def feature_cards_api(run: str, session: SessionDep,
                      features: Annotated[str, Query(max_length=20_000, description="layer/index, comma-separated")]
                      ) -> dict[str, Any]:
    keys = []
    for part in features.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
        if m is None:
            raise BadInput(f"cannot read feature {part!r}: write layer/index, e.g. 3/17", 422)
        keys.append((int(m.group(1)), int(m.group(2))))
    try:
        return feature_cards(session, run, keys)
    except ValueError as exc:
        raise BadInput(str(exc), 422) from None


@router.get("/api/runs/{run}/graphs/{graph_id}/circuit-tracer.json", name="graph_download",
            summary="The graph as circuit-tracer / Neuronpedia graph JSON", response_model=dict[str, Any])
def graph_download(request: Request, run: str, graph_id: GraphId, session: SessionDep) -> Response:
    try:
        data = circuit_tracer_json(session, run, graph_id)
    except GraphFormatError as exc:
        raise BadInput(str(exc), 409) from None
    filename = re.sub(r"[^A-Za-z0-9._-]+", "_", data["metadata"]["slug"]) or f"graph-{graph_id}"
    return _json(request, data, {"Content-Disposition": f'attachment; filename="{filename}.json"'})


class NewGraph(BaseModel):
    """The "new graph" form: a prompt and what to explain (a token, or a logit difference)."""

    prompt: str
    chat: bool = True
    target_token: StrictStr | StrictInt | None = None  # strict: a JSON true is not token id 1
    contrast_token: StrictStr | StrictInt | None = None
    mode: str = "relp"
    max_feature_nodes: int = 10_000
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    slug: str | None = None


class Queued(BaseModel):
    job_id: int
    status_url: str


@router.post("/api/runs/{run}/graphs", response_model=Queued, status_code=202, name="api_new_graph",
             summary="Queue an interactive attribute job; poll status_url until it names the graph")
def new_graph(request: Request, run: str, body: NewGraph, session: SessionDep) -> Queued:
    run_id = get_run(session, run).id
    payload = {k: v for k, v in body.model_dump().items() if v not in (None, "")}
    try:
        job_id = submit_attribute(session, {"run_id": run_id, **payload})
        session.commit()
    except AttributeRequestError as exc:
        session.rollback()
        raise BadInput(str(exc), exc.status_code) from None
    return Queued(job_id=job_id, status_url=str(request.app.url_path_for("api_graph_job", run=str(run_id),
                                                                       job_id=str(job_id))))


class GraphJob(BaseModel):
    job_id: int
    status: str
    progress: dict[str, Any] | None = None
    error: str | None = None
    graph_id: int | None = None
    graph_url: str | None = None
    message: str | None = None


@router.get("/api/runs/{run}/graph-jobs/{job_id}", response_model=GraphJob, name="api_graph_job",
            summary="An attribute job's state; graph_url once the graph is stored")
def graph_job(request: Request, run: str, job_id: Annotated[int, Path(ge=1)], session: SessionDep) -> GraphJob:
    run_id = get_run(session, run).id
    job = queue.get_job(session, job_id)
    if job is None or job.kind != "attribute" or job.run_id != run_id:
        raise NotFound(f"No graph job {job_id} in run {run_id}.")
    result = job.result if isinstance(job.result, dict) else {}
    gid = result.get("graph_id") if isinstance(result.get("graph_id"), int) else None
    last_error = (job.error or "").strip().splitlines()[-1] if job.error else None
    return GraphJob(job_id=job.id, status=str(job.status), progress=job.progress, error=last_error, graph_id=gid,
                    graph_url=str(request.app.url_path_for("graph_page", run=str(run_id), graph_id=str(gid)))
                    if gid else None, message=result.get("message"))


class Imported(BaseModel):
    id: int
    url: str
    n_nodes: int
    n_links: int


@router.post("/api/runs/{run}/graphs/import", response_model=Imported, status_code=201, name="api_import_graph",
             summary="Import a graph JSON file (circuit-tracer, Neuronpedia or ours) sent as the request body")
async def import_graph_api(request: Request, run: str, session: SessionDep,
                           slug: Annotated[str | None, Query(max_length=200)] = None) -> Imported:
    run_id = get_run(session, run).id
    try:
        data = parse_graph_bytes(await request.body())
        graph_id, n_nodes, n_links = import_graph(session, run_id, data, slug=slug)
        session.commit()
    except GraphImportError as exc:
        session.rollback()
        raise BadInput(str(exc), exc.status_code) from None
    return Imported(id=graph_id, n_nodes=n_nodes, n_links=n_links,
                    url=str(request.app.url_path_for("graph_page", run=str(run_id), graph_id=str(graph_id))))


# -- other exports ---------------------------------------------------------------------------------------

Layer = Annotated[int, Path(ge=0, le=10_000)]
Index = Annotated[int, Path(ge=0, le=10_000_000)]


@router.get("/api/runs/{run}/features/{layer}/{index}/circuit-tracer.json", response_model=FeatureFile,
            name="feature_download", tags=["features"], summary="A feature in circuit-tracer's feature JSON format")
def feature_download(run: str, layer: Layer, index: Index, session: SessionDep) -> JSONResponse:
    data = feature_file(session, run, layer, index).model_dump(mode="json")
    return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="feature-{layer}-{index}.json"'})


@router.get("/api/runs/{run}/feature-files/{feature}.json", response_model=FeatureFile, tags=["features"],
            name="feature_by_cantor", summary="A feature by the graph JSON's cantor-paired id (a feature_json_base_url)")
def feature_by_cantor(run: str, feature: Annotated[int, Path(ge=0, le=2**53)], session: SessionDep) -> JSONResponse:
    layer, index = cantor_unpair(feature)
    return JSONResponse(feature_file(session, run, layer, index).model_dump(mode="json"))


JSONL_RESPONSE = {200: {"content": {"application/x-ndjson": {}}, "description": "One JSON object per line."}}


@router.get("/api/runs/{run}/ablations/{ablation_id}/transcript.jsonl", name="ablation_transcript",
            tags=["ablations"], summary="An ablation as JSONL: one line per condition",
            response_class=StreamingResponse, responses=JSONL_RESPONSE)
def ablation_jsonl(run: str, ablation_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep) -> StreamingResponse:
    lines = ablation_transcript(session, run, ablation_id)
    return StreamingResponse(jsonl_lines(lines), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="ablation-{ablation_id}.jsonl"'})


@router.get("/api/runs/{run}/experiments/{experiment_id}/transcript.jsonl", name="experiment_transcript",
            tags=["experiments"], summary="An experiment as JSONL: one line per (prompt, condition)",
            response_class=StreamingResponse, responses=JSONL_RESPONSE)
def experiment_jsonl(run: str, experiment_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep,
                     ) -> StreamingResponse:
    lines = experiment_transcript(session, run, experiment_id)
    return StreamingResponse(jsonl_lines(lines), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="experiment-{experiment_id}.jsonl"'})
