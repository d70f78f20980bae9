"""The dashboard application: ``create_app(settings)`` builds everything; nothing happens at import.

Every page ``/x`` has a JSON twin ``/api/x`` (in the OpenAPI schema) built by the same context
builder in ``app.web.data``. Errors answer in the caller's language: JSON under ``/api/``, an HTML
page elsewhere, a small fragment for htmx requests. A missing row is a 404, a bad parameter a 400
or 422 with the offending value, and nothing the user types turns into a 500.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from app.web.errors import install_error_handlers
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


# --------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None, *, engine: Any = None) -> FastAPI:
    """The web app for ``settings`` (default: from the environment); ``engine`` overrides its database."""
    from app.web.routes import ablations, experiments, features, graphs, jobs, pipelines, runs

    settings = settings or Settings()
    app = FastAPI(title="AdapterLens", version="0.1.0",
                  description="Transcoder-adapter features, attribution graphs and ablations. "
                              "Every page has its data at the same path under /api/.")
    app.state.settings = settings
    app.state.engine = engine if engine is not None else make_engine(settings)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    app.state.templates = build_templates(app, str(TEMPLATES_DIR), f"/static/{HTMX_FILE}",
                                          f"/vendor/plotly-{plotly_version()}.min.js")
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    @app.get(f"/vendor/plotly-{plotly_version()}.min.js", include_in_schema=False, name="plotly_js")
    def plotly_js() -> FileResponse:
        return FileResponse(plotly_js_path(), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})

    for module in (runs, features, graphs, ablations, experiments, jobs, pipelines):
        app.include_router(module.router)
    return app


def serve(settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the dashboard with uvicorn until interrupted (what ``adapterlens serve`` calls)."""
    import uvicorn

    app = create_app(settings)
    log.info("Serving AdapterLens on http://%s:%s", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
