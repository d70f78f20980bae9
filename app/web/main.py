"""The dashboard application: ``create_app(settings)`` builds everything; nothing happens at import.

Every page ``/x`` has a JSON twin ``/api/x`` (in the OpenAPI schema) built by the same context
builder in ``app.web.data``. Errors answer in the caller's language: JSON under ``/api/``, an HTML
page elsewhere, a small fragment for htmx requests. A missing row is a 404, a bad parameter a 400
or 422 with the offending value, and nothing the user types turns into a 500.
"""

from __future__ import annotations

import gc
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from app.web.errors import API_ERRORS, install_error_handlers
from app.web.security import Guard
from app.web.templating import build_templates

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
HTMX_FILE = "vendor/htmx-2.0.11.min.js"  # vendored once from npm (htmx.org@2); see static/vendor/


def plotly_js_path() -> Path:
    """plotly.js as shipped inside the installed plotly package (nothing fetched at run time)."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def plotly_version() -> str:
    import plotly

    return plotly.__version__


def docs_assets_dir() -> Path:
    """Swagger UI and ReDoc as shipped inside the installed fastapi-offline package (no CDN at run time)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"  # ReDoc's side menu shows this image from its CDN
EMPTY_IMAGE = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


@lru_cache(maxsize=1)
def _redoc_js() -> bytes:
    """ReDoc's bundle with its one off-site reference (the side menu's logo) pointed at an empty image."""
    return (docs_assets_dir() / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO.encode(), EMPTY_IMAGE.encode())


def _docs_routes(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from local files; their start-up code is static/js/docs.js, no inline script."""

    @app.get("/docs-assets/redoc.standalone.js", include_in_schema=False, name="redoc_js")
    def redoc_js() -> Response:
        return Response(_redoc_js(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})

    def page(request: Request, template: str) -> HTMLResponse:
        return request.app.state.templates.TemplateResponse(request, template, {"openapi_url": app.openapi_url})

    @app.get("/docs", include_in_schema=False, name="docs")
    def swagger_ui(request: Request) -> HTMLResponse:
        return page(request, "docs_swagger.html")

    @app.get("/redoc", include_in_schema=False, name="redoc")
    def redoc(request: Request) -> HTMLResponse:
        return page(request, "docs_redoc.html")


# --------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None, *, engine: Any = None) -> FastAPI:
    """The web app for ``settings`` (default: from the environment); ``engine`` overrides its database."""
    from app.web.routes import ablations, experiments, features, graphs, jobs, lens, pipelines, runs, traces

    settings = settings or Settings()
    app = FastAPI(title="AdapterLens", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Transcoder-adapter features, attribution graphs and ablations. "
                              "Every page has its data at the same path under /api/.")
    app.state.settings = settings
    app.state.engine = engine if engine is not None else make_engine(settings)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    app.state.templates = build_templates(app, str(TEMPLATES_DIR), f"/static/{HTMX_FILE}",
                                          f"/vendor/plotly-{plotly_version()}.min.js")
    install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)
    _docs_routes(app)  # before the /docs-assets mount: one of its files is served rewritten
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(docs_assets_dir())), name="docs_assets")

    @app.get(f"/vendor/plotly-{plotly_version()}.min.js", include_in_schema=False, name="plotly_js")
    def plotly_js() -> FileResponse:
        return FileResponse(plotly_js_path(), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})

    for module in (runs, features, graphs, ablations, experiments, lens, traces, jobs, pipelines):
        app.include_router(module.router, responses=API_ERRORS)
    return app


def serve(settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8000, *,
          access_log: bool = True, workers: int = 1) -> None:
    """Run the dashboard with uvicorn until interrupted (what ``adapterlens serve`` calls).

    ``workers`` > 1: that many server processes share the port (uvicorn's supervisor). A page is Python work under
    one GIL, so one process serves one core's worth of pages (benchmarks/web.py ``--server-workers``); each
    process builds its app from the environment (:class:`Settings`), so ``settings`` must be what the
    environment says (the CLI exports its global options there)."""
    import uvicorn

    log.info("Serving AdapterLens on http://%s:%s%s", host, port, f" with {workers} processes" if workers > 1 else "")
    if workers > 1:
        if settings is not None and settings != Settings():
            raise ValueError("serve(workers > 1) builds each process's app from the environment: put the settings "
                             "there (ADAPTERLENS_*, DATABASE_URL) instead of passing them")
        uvicorn.run("app.web.main:served_app", factory=True, workers=workers, host=host, port=port,
                    log_level="info", access_log=access_log)
        return
    uvicorn.run(served_app(settings), host=host, port=port, log_level="info", access_log=access_log)


def served_app(settings: Settings | None = None) -> FastAPI:
    """The app a server process runs: :func:`create_app`, then everything alive so far frozen out of the garbage
    collector's scans (``gc.freeze``).

    The imports and the app (SQLAlchemy, pydantic, Jinja, the routes) leave hundreds of thousands of objects that
    live as long as the process. Every full collection walked them all: ~1 request in 100–200 waited 110–190 ms,
    on every endpoint (``benchmarks/web.py --concurrency 1``: max 138–187 ms against p50 15–25 ms). Frozen, they
    are never scanned; a collection then walks only what requests made."""
    app = create_app(settings)
    gc.freeze()
    return app
