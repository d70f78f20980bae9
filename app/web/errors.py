"""Errors answer in the caller's language: JSON under ``/api/``, a fragment for htmx, else an HTML page.

Every error body has one shape, :class:`ErrorBody` (``{"detail": text}`` or, for invalid parameters,
``{"detail": [{"where", "msg", "input"}]}``), declared for every API route (:data:`API_ERRORS`). Bodies
never echo more than a short prefix of what was sent (:func:`clip`), and text that cannot be encoded
(a lone surrogate from a JSON ``\\ud800`` escape) is shown escaped instead of breaking the answer. A database
that cannot answer is a 503 that names no host, port or driver message (those go to the log).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, InterfaceError, OperationalError, ProgrammingError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.web.data.common import BadInput, NotFound

log = logging.getLogger(__name__)

INPUT_SHOWN = 80  # characters of an offending input value echoed back
DETAIL_SHOWN = 600  # characters of a message echoed back (messages quote parts of the request)
RETRY_DB_S = 5  # Retry-After (seconds) of a 503 when the database cannot answer


class ErrorItem(BaseModel):
    where: str = Field(description="Which parameter or body field (dotted path), or 'request'.")
    msg: str
    input: Any = Field(None, description="The offending value, cut to a short prefix.")


class ErrorBody(BaseModel):
    """Every error's body."""

    detail: str | list[ErrorItem]


def _declared(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _declared("Bad request: a parameter the store cannot use (e.g. an unknown cursor), a NUL in the URL, "
                   "or a Host this dashboard does not answer to"),
    404: _declared("No such run, feature, graph, ablation, experiment or job"),
    422: _declared("Invalid parameters or body (each problem with where, msg and a prefix of the input)"),
    503: _declared("The database cannot answer (down, restarting or not migrated); try again later"),
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    403: _declared("Cross-site request refused (Origin or Referer not this dashboard)"),
    413: _declared("Request body too large"),
    415: _declared("The JSON API takes application/json bodies only"),
}
QUEUE_FULL = {429: _declared("Too much interactive work is waiting; retry after the Retry-After seconds")}


def clip(value: Any, limit: int = INPUT_SHOWN) -> Any:
    """``value`` made safe to echo: strings cut to ``limit`` characters and any unencodable text escaped.

    Numbers, booleans and None pass through; anything else is shown by its (clipped) ``repr``.
    """
    if isinstance(value, bool | int | float | type(None)):
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            return f"an integer of {value.bit_length()} bits"  # its digits could be as long as the body
        return value
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text):,} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, status: int, title: str, detail: Any,
                   headers: dict[str, str] | None = None) -> Response:
    detail = clip(detail, DETAIL_SHOWN) if isinstance(detail, str) else detail
    if wants_json(request):
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)
    message = detail if isinstance(detail, str) else "; ".join(
        f"{d.get('where', '')}: {d.get('msg', '')}" if isinstance(d, dict) else clip(d) for d in detail)
    if request.headers.get("HX-Request"):
        return HTMLResponse(f'<div class="error-box">{escape(message)}</div>', status_code=status, headers=headers)
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, "error.html", {"status": status, "title": title, "message": message},
                                      status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        loc = [clip(str(p), 40) for p in e.get("loc", ()) if p not in ("query", "path", "body")]
        out.append({"where": ".".join(loc) or "request", "msg": clip(e.get("msg", "invalid"), 200),
                    "input": clip(e.get("input"))})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return error_response(request, 404, "Not found", str(exc))

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput) -> Response:
        title = {400: "Bad request", 429: "Too many waiting requests"}.get(exc.status_code, "Invalid request")
        return error_response(request, exc.status_code, title, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, "Invalid parameters", _validation_detail(exc))

    @app.exception_handler(DataError)
    async def _out_of_range(request: Request, exc: DataError) -> Response:
        # The database refused a value (a number beyond its column, text it cannot store): the input's fault.
        log.warning("Database refused a value on %s: %s", request.url.path, str(exc.orig).splitlines()[0])
        return error_response(request, 400, "Bad request", "A value in the request is out of range for the store.")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(ProgrammingError)
    async def _db_not_ready(request: Request, exc: Exception) -> Response:
        log.error("Database error on %s: %s", request.url.path, exc)
        return error_response(request, 503, "Database not ready",
                              "The database cannot answer right now (restarting, down, or not migrated: "
                              "`adapterlens db upgrade`). Try again in a few seconds.",
                              {"Retry-After": str(RETRY_DB_S)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        title = {404: "Not found", 405: "Method not allowed", 413: "Request too large"}.get(exc.status_code, "Error")
        detail = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else (
            f"Nothing at {request.url.path}.")
        return error_response(request, exc.status_code, title, detail, getattr(exc, "headers", None))
