"""Errors answer in the caller's language: JSON under ``/api/``, a fragment for htmx, else an HTML page."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from sqlalchemy.exc import OperationalError, ProgrammingError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.web.data.common import BadInput, NotFound

log = logging.getLogger(__name__)

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
