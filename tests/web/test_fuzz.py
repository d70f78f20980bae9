"""An API fuzzing run (schemathesis) over every operation of the OpenAPI document and over the HTML routes.

The store is the seeded world (tests/seed.py); generated path parameters are swapped for the world's real
ids three times in four, so the fuzzer reaches real pages and real state changes (cancel, retry, ablate)
as well as 404s. Positive cases (valid by the document) and negative ones (invalid by it) for each
operation, bounded and derandomized, so a run is repeatable and takes seconds:

- JSON API: 0 server errors and 0 responses that violate the document (status codes declared, bodies and
  headers matching their declared schemas, invalid input refused);
- HTML routes (pages and forms, outside the document): 0 server errors. Their document is built for the
  fuzzer from the same app, with every route included.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from app.db.session import make_engine
from app.settings import Settings
from app.web import create_app
from tests.seed import World, seed_world
from tests.web.conftest import BASE_URL

EXAMPLES = 12  # per operation and generation mode
API_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance, negative_data_rejection]
HTML_CHECKS = [not_a_server_error]
# Invalid input may also be refused for its size (413): the default list of rejection codes lacks it.
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
    "expected-statuses": [400, 403, 404, 409, 413, 415, 422, 429]}}})


def _known_ids(world: World) -> dict[str, list[Any]]:
    return {"run": [str(world.run_id), "demo", str(world.empty_run_id)], "graph_id": [world.graph_id],
            "ablation_id": [world.ablation_id], "experiment_id": [world.experiment_id],
            "job_id": sorted(world.job_ids.values()), "layer": [0, 1, 2], "index": [0, 3, 7, 15]}


def _seeded(world: World, mode: GenerationMode) -> Callable[[tuple[Any, int]], Any]:
    """Swap generated path parameters for real ids (3 times in 4); in negative cases only the run key, which
    no schema can make invalid, so a case stays as invalid as it was generated."""
    known = _known_ids(world)

    def swap(drawn: tuple[Any, int]) -> Any:
        case, pick = drawn
        if pick and case.path_parameters:
            for name, values in known.items():
                if name in case.path_parameters and (mode is GenerationMode.POSITIVE or name == "run"):
                    case.path_parameters[name] = values[pick % len(values)]
        return case

    return swap


def _fuzz(schema: Any, world: World, checks: list) -> dict[str, int]:
    """Run every operation of ``schema``; returns the number of calls per operation. Failures raise."""
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = st.tuples(op.as_strategy(generation_mode=mode), st.integers(0, 3)).map(_seeded(world, mode))

            @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=strategy)
            def call(case: Any) -> None:
                response = case.call(base_url=BASE_URL, headers={"Origin": BASE_URL})
                calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
                case.validate_response(response, checks=checks)

            try:
                call()
            except Unsatisfiable:  # nothing can be invalid about an operation without parameters
                assert mode is GenerationMode.NEGATIVE, op.label
    return calls


@pytest.fixture
def seeded_app(db_url: str, tmp_path: Path):
    engine = make_engine(db_url)
    world = seed_world(engine, tmp_path / "tokenizer")
    yield create_app(Settings(database_url=db_url, data_dir=tmp_path), engine=engine), world
    engine.dispose()


def test_fuzz_the_json_api(seeded_app) -> None:
    app, world = seeded_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG, headers={"Host": "127.0.0.1"})
    calls = _fuzz(schema, world, API_CHECKS)
    assert len(calls) == sum(len(methods) for methods in app.openapi()["paths"].values())  # every operation
    assert sum(calls.values()) > 10 * len(calls)


def _with_every_route(app: FastAPI) -> dict[str, Any]:
    """An OpenAPI document of the app's page, fragment and form routes (they are outside its own document):
    the same endpoints registered on a scratch app that includes them, so FastAPI describes their parameters."""
    from fastapi.routing import iter_route_contexts

    scratch = FastAPI(title="pages", version="0")
    for c in iter_route_contexts(app.routes):
        route = c.original_route
        if isinstance(route, APIRoute) and not c.path.startswith(("/api/", "/vendor/", "/docs")) \
                and c.path not in ("/redoc",):
            scratch.add_api_route(c.path, route.endpoint, methods=sorted(route.methods), name=route.name,
                                  include_in_schema=True)
    return scratch.openapi()


def test_fuzz_the_pages_and_forms(seeded_app) -> None:
    app, world = seeded_app
    document = _with_every_route(app)
    assert "/runs/{run}/ablations" in document["paths"] and "post" in document["paths"]["/runs/{run}/ablations"]
    schema = schemathesis.openapi.from_dict(document, config=CONFIG)
    schema.app = app
    calls = _fuzz(schema, world, HTML_CHECKS)
    assert {"POST /jobs/{job_id}/cancel", "GET /runs/{run}/features/{layer}/{index}"} <= set(calls)
