"""The feature index and the feature page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.web.data.feature import FeaturePage, feature_page
from app.web.data.features import FeatureListPage, FeatureQuery, feature_list
from app.web.deps import SessionDep
from app.web.render import default_prompt, render

router = APIRouter(tags=["features"])

Layer = Annotated[int, Path(ge=0, le=10_000, description="Layer of the feature.")]
Index = Annotated[int, Path(ge=0, le=100_000_000, description="Index of the feature in its layer.")]


@router.get("/runs/{run}/features", include_in_schema=False, name="features_page")
def features_html(request: Request, run: str, session: SessionDep,
                  query: Annotated[FeatureQuery, Query()]) -> Response:
    return render(request, "features.html", feature_list(session, run, query))


@router.get("/api/runs/{run}/features", response_model=FeatureListPage, name="api_features",
            summary="Filter, search and sort a run's features (keyset-paginated)")
def features_api(run: str, session: SessionDep, query: Annotated[FeatureQuery, Query()]) -> FeatureListPage:
    return feature_list(session, run, query)


@router.get("/runs/{run}/features/{layer}/{index}", include_in_schema=False, name="feature_page")
def feature_html(request: Request, run: str, layer: Layer, index: Index, session: SessionDep) -> Response:
    page = feature_page(session, run, layer, index)
    return render(request, "feature.html", page, ablate_prompt=default_prompt(session, page.run.id))


@router.get("/api/runs/{run}/features/{layer}/{index}", response_model=FeaturePage, name="api_feature",
            summary="One feature: examples, statistics, logit lens, graphs, neighbours")
def feature_api(run: str, layer: Layer, index: Index, session: SessionDep) -> FeaturePage:
    return feature_page(session, run, layer, index)
