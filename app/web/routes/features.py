"""The feature index and the feature page."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from app.web.data.common import MAX_ID
from app.web.data.feature import FeaturePage, feature_page
from app.web.data.features import CSV_PAGE, FeatureListPage, FeatureQuery, feature_list, features_csv_lines
from app.web.data.lens import feature_text_test
from app.web.deps import SessionDep
from app.web.render import ablate_limit, example_source, graph_prompt_source, render

router = APIRouter(tags=["features"])

Layer = Annotated[int, Path(ge=0, le=10_000, description="Layer of the feature.")]
Index = Annotated[int, Path(ge=0, le=100_000_000, description="Index of the feature in its layer.")]


@router.get("/runs/{run}/features", include_in_schema=False, name="features_page")
def features_html(request: Request, run: str, session: SessionDep,
                  query: Annotated[FeatureQuery, Query()]) -> Response:
    """The index; an htmx request (a filter change, the pager) gets only the results part."""
    page = feature_list(session, run, query)
    partial = request.headers.get("HX-Request") and request.headers.get("HX-Target") == "feature-results"
    return render(request, "_feature_results.html" if partial else "features.html", page)


@router.get("/api/runs/{run}/features.csv", name="api_features_csv", response_class=StreamingResponse,
            summary="Every feature matching the index's filters, as CSV (all pages)",
            responses={200: {"content": {"text/csv": {}}, "description": "One row per feature."}})
def features_csv(request: Request, run: str, session: SessionDep,
                 query: Annotated[FeatureQuery, Query()]) -> StreamingResponse:
    first = feature_list(session, run, query.model_copy(update={"after": None, "limit": CSV_PAGE}))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", first.run.name) or "run"
    lines = features_csv_lines(request.app.state.sessionmaker, run, query, first)
    return StreamingResponse(lines, media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="{name}-features.csv"'})


@router.get("/api/runs/{run}/features", response_model=FeatureListPage, name="api_features",
            summary="Filter, search and sort a run's features (keyset-paginated)")
def features_api(run: str, session: SessionDep, query: Annotated[FeatureQuery, Query()]) -> FeatureListPage:
    return feature_list(session, run, query)


LensQuery = Annotated[int | None, Query(ge=1, le=MAX_ID, description="A diff lens whose text to test this feature on.")]


def _page(session, run: str, layer: int, index: int, lens: int | None) -> FeaturePage:
    page = feature_page(session, run, layer, index)
    if lens is not None:
        page.text_test = feature_text_test(session, run, layer, index, lens)
    return page


@router.get("/runs/{run}/features/{layer}/{index}", include_in_schema=False, name="feature_page")
def feature_html(request: Request, run: str, layer: Layer, index: Index, session: SessionDep,
                 lens: LensQuery = None) -> Response:
    """The feature page; ``lens`` (a diff lens id, from its "test your text" form) adds this feature on that text."""
    page = _page(session, run, layer, index, lens)
    top = page.examples.get("top") or []
    sources = [example_source(top[0])] if top else []
    graph = graph_prompt_source(session, page.run.id)
    return render(request, "feature.html", page, sources=sources + ([graph] if graph else []),
                  limit=ablate_limit(request))


@router.get("/api/runs/{run}/features/{layer}/{index}", response_model=FeaturePage, name="api_feature",
            summary="One feature: examples, statistics, logit lens, graphs, neighbours")
def feature_api(run: str, layer: Layer, index: Index, session: SessionDep, lens: LensQuery = None) -> FeaturePage:
    return _page(session, run, layer, index, lens)
