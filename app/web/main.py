"""The dashboard application: ``create_app(settings)`` builds everything; nothing happens at import.

Every page ``/x`` has a JSON twin ``/api/x`` (in the OpenAPI schema) built by the same context
builder in ``app.web.data``. Errors answer in the caller's language: JSON under ``/api/``, an HTML
page elsewhere, a small fragment for htmx requests. A missing row is a 404, a bad parameter a 400
or 422 with the offending value, and nothing the user types turns into a 500.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape
from pydantic_core import to_jsonable_python
from sqlalchemy.exc import OperationalError, ProgrammingError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from app.web.data.common import BadInput, NotFound

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


# ----------------------------------------------------------------------------------------- filters


def fmt(value: Any, digits: int = 3) -> str:
    """A number for people: significant digits, no scientific notation for ordinary sizes."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def pct(value: Any) -> str:
    if value is None:
        return "–"
    return f"{100 * float(value):.1f}%"


def shade(act: float | None, max_act: float | None) -> str:
    """Opacity (0–1) of a token's highlight: its activation relative to the feature's maximum."""
    if not act or not max_act or max_act <= 0:
        return "0"
    return f"{min(1.0, max(0.0, float(act) / float(max_act))):.3f}"


def token_cells(ex: Any, max_act: float | None) -> list[tuple[str, str, str, str]]:
    """Per token of an example: (css classes, shade, activation text, display text) for ``_tokens.html``.

    Computed here in one pass because a feature page shows thousands of tokens; the text is returned
    raw and escaped by the template's autoescape like any other value.
    """
    lo, hi = ex.window
    out = []
    for i, (text, act) in enumerate(zip(ex.tokens, ex.acts, strict=True)):
        cls = "tok"
        if i == ex.focus:
            cls += " focus"
        if i < lo or i >= hi:
            cls += " out"
        if act > 0:
            cls += " on"
        if "\n" in text:
            cls += " nl"
        # Class, shade and activation are strings we generate from numbers: marked safe so that only the
        # token text (the one untrusted value) goes through autoescaping, once per token.
        out.append((Markup(cls), Markup(shade(act, max_act)), Markup(fmt(act)), visible(text)))
    return out


def visible(text: str) -> str:
    """Token text with layout characters made visible (a newline token must not vanish)."""
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") if text else "∅"


PALETTE = ("#8a8f98", "#e8793a", "#4a7bd0", "#3aa675", "#b04ad0")  # condition colours, baseline first


def hist_traces(conditions: list[Any], key: str) -> list[dict[str, Any]]:
    """Overlaid Plotly histograms of one per-prompt quantity, one trace per condition."""
    return [
        {"type": "histogram", "name": c.name, "x": [v for v in getattr(c, key) if v is not None], "opacity": 0.6,
         "marker": {"color": PALETTE[i % len(PALETTE)]}, "bingroup": key}
        for i, c in enumerate(conditions)
    ]


def hist_fig(hist: Any, color: str, xtitle: str, *, x_range: list[float] | None = None) -> dict[str, Any]:
    """A Plotly bar figure of a stored histogram (``edges`` has one more entry than ``counts``).

    Bars span their bins exactly (left edge + width), so log-spaced bins draw right on a log axis,
    which is used when the edges are positive and span more than two decades.
    """
    edges, counts = list(hist.edges), list(hist.counts)
    if len(edges) == len(counts) + 1:
        left, width = edges[:-1], [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    else:
        left, width = edges[: len(counts)], None
    log = bool(edges) and edges[0] > 0 and edges[-1] / edges[0] > 100
    trace: dict[str, Any] = {"type": "bar", "x": left, "y": counts, "offset": 0, "marker": {"color": color},
                             "hovertemplate": "%{x:.3g}: %{y}<extra></extra>"}
    if width is not None:
        trace["width"] = width
    xaxis: dict[str, Any] = {"title": {"text": xtitle}, "type": "log" if log else "linear"}
    if x_range is not None:
        xaxis["range"] = x_range
    return {"data": [trace], "layout": {"xaxis": xaxis, "yaxis": {"title": {"text": "count"}}, "bargap": 0}}


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(to_jsonable_python(obj), **kwargs)


def build_templates(app: FastAPI) -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt=fmt, pct=pct, visible=visible)
    env.policies["json.dumps_function"] = _dumps  # |tojson takes pydantic models too
    env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    env.globals.update(
        shade=shade,
        hist_traces=hist_traces,
        hist_fig=hist_fig,
        token_cells=token_cells,
        path=lambda name, **params: app.url_path_for(name, **{k: str(v) for k, v in params.items()}),
        qs=lambda params: ("?" + urlencode(params)) if params else "",
        htmx_src=f"/static/{HTMX_FILE}",
        plotly_src=f"/vendor/plotly-{plotly_version()}.min.js",
    )
    return Jinja2Templates(env=env)


# ------------------------------------------------------------------------------------------ errors


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, status: int, title: str, detail: Any) -> Response:
    if wants_json(request):
        return JSONResponse({"detail": detail}, status_code=status)
    message = detail if isinstance(detail, str) else "; ".join(
        f"{d.get('where', '')}: {d.get('msg', '')}" if isinstance(d, dict) else str(d) for d in detail)
    if request.headers.get("HX-Request"):
        return HTMLResponse(f'<div class="error-box">{_escape(message)}</div>', status_code=status)
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, "error.html", {"status": status, "title": title, "message": message},
                                      status_code=status)


def _escape(text: str) -> str:
    return str(escape(text))


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body")]
        out.append({"where": ".".join(loc) or "request", "msg": e.get("msg", "invalid"), "input": _jsonable(e.get("input"))})
    return out


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return error_response(request, 404, "Not found", str(exc))

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput) -> Response:
        return error_response(request, exc.status_code, "Bad request" if exc.status_code == 400 else "Invalid request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, "Invalid parameters", _validation_detail(exc))

    @app.exception_handler(OperationalError)
    @app.exception_handler(ProgrammingError)
    async def _db_not_ready(request: Request, exc: Exception) -> Response:
        log.error("Database error on %s: %s", request.url.path, exc)
        return error_response(request, 503, "Database not ready",
                              "The database cannot answer (is it running, and migrated? run `adapterlens db upgrade`): "
                              + str(getattr(exc, "orig", exc)).splitlines()[0])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
        detail = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else (
            f"Nothing at {request.url.path}.")
        return error_response(request, exc.status_code, title, detail)


# --------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None, *, engine: Any = None) -> FastAPI:
    """The web app for ``settings`` (default: from the environment); ``engine`` overrides its database."""
    from app.web.routes import ablations, experiments, features, graphs, jobs, runs

    settings = settings or Settings()
    app = FastAPI(title="AdapterLens", version="0.1.0",
                  description="Transcoder-adapter features, attribution graphs and ablations. "
                              "Every page has its data at the same path under /api/.")
    app.state.settings = settings
    app.state.engine = engine if engine is not None else make_engine(settings)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    app.state.templates = build_templates(app)
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    @app.get(f"/vendor/plotly-{plotly_version()}.min.js", include_in_schema=False, name="plotly_js")
    def plotly_js() -> FileResponse:
        return FileResponse(plotly_js_path(), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})

    for module in (runs, features, graphs, ablations, experiments, jobs):
        app.include_router(module.router)
    return app


def serve(settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the dashboard with uvicorn until interrupted (what ``adapterlens serve`` calls)."""
    import uvicorn

    app = create_app(settings)
    log.info("Serving AdapterLens on http://%s:%s", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
