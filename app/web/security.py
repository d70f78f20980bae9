"""What the dashboard refuses before a route runs, and the headers every answer carries.

One ASGI middleware (:class:`Guard`), outermost, so that nothing behind it sees a refused request:

- **Host allow-list** (``Settings.allowed_hosts``, loopback by default): a page served under a foreign
  name is a DNS-rebinding attack (``attacker.example`` resolving to 127.0.0.1 reads the API as same-origin),
  so any other ``Host`` gets a 400.
- **Cross-site writes**: every state-changing request (not GET/HEAD/OPTIONS) must come from the dashboard's
  own origin (``Origin``, else ``Referer``, same host and port as ``Host``, or one of
  ``Settings.trusted_origins``); ``Origin: null`` (file:// pages, sandboxed frames) is foreign. A request
  with neither header is a non-browser client (curl, scripts) and passes, unless its body has a type an
  HTML form can send (``text/plain``, urlencoded, multipart): browsers always send ``Origin`` with those.
  JSON routes under ``/api/`` take ``application/json`` bodies only (415), so a cross-site "simple" request
  cannot reach them even from a browser that hides its origin.
- **NUL** (``%00``) in the path or query string: 400 (Postgres text cannot hold it; no name or id has it).
- **Body size**: more than ``Settings.max_body_bytes`` gets a 413, by ``Content-Length`` before reading or
  while reading a chunked body.

Headers on every response: a Content-Security-Policy with a per-request script nonce (templates read it as
``request.state.csp_nonce``; a route that sets its own policy keeps it), ``frame-ancestors 'none'`` and
``X-Frame-Options: DENY`` (no clickjacking of cancel/retry), ``X-Content-Type-Options: nosniff``,
``Referrer-Policy: same-origin`` (our own forms keep a real ``Origin``) and
``Cross-Origin-Resource-Policy: same-origin``.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import Settings

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIMPLE_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")  # no CORS preflight
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def page_policy(nonce: str) -> str:
    """The pages' CSP: scripts only from here or with this request's nonce; no frames, plugins or base tags.

    Styles may be inline: Plotly injects its stylesheets as ``<style>`` elements at run time (and pages shade
    tokens with style attributes), and a style cannot run script. htmx's own injected style is switched off
    anyway (base.html's ``htmx-config``), its rules live in app.css.
    """
    return ("default-src 'self'; "
            f"script-src 'self' 'nonce-{nonce}'; "
            "style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self' blob:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _host_port(netloc: str, default_port: int | None) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) → (lower-case host without brackets, port or ``default_port``)."""
    try:
        parts = urlsplit("//" + netloc)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number, unbalanced brackets
        return "", None
    return host, port if port is not None else default_port


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether ``host`` (no port) matches the allow-list: exact names, ``*.suffix`` or ``*``."""
    if not host:
        return False
    for pattern in allowed:
        pattern = pattern.strip().lower().strip("[]")
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
    return False


def same_origin(origin: str, host_header: str, trusted: Iterable[str]) -> bool:
    """Whether an ``Origin`` (or a Referer's origin) is the dashboard itself or a trusted origin.

    The scheme is not compared with ours: behind a TLS-terminating proxy the browser says ``https`` while the
    app sees plain http. The host must equal ``Host``'s and the port its port (or, when ``Host`` names none,
    the origin's default port).
    """
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return False
    normal = f"{parts.scheme}://{parts.netloc}".lower()
    if any(normal == t.strip().rstrip("/").lower() for t in trusted):
        return True
    o_host, o_port = _host_port(parts.netloc, DEFAULT_PORTS[parts.scheme])
    h_host, h_port = _host_port(host_header, None)
    return bool(o_host) and o_host == h_host and (o_port == h_port if h_port is not None
                                                  else o_port == DEFAULT_PORTS[parts.scheme])


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class BodyTooLarge(HTTPException):
    """Raised while reading a body past the limit; FastAPI re-raises its HTTPException from body parsing."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit:,} bytes.")


class Guard:
    """The middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.allowed_hosts = tuple(settings.allowed_hosts)
        self.trusted_origins = tuple(settings.trusted_origins)
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        if refusal is not None:
            status, message = refusal
            log.warning("Refused %s %s: %s", scope.get("method"), scope.get("path"), message)
            await self._answer(scope, send, status, message, nonce)
            return
        await self.app(scope, self._limited(receive), self._with_headers(send, nonce))

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host_header = headers.get("host", "")
        host, _ = _host_port(host_header, None)
        if not host_allowed(host, self.allowed_hosts):
            return 400, (f"This dashboard does not answer to the host name {host_header[:100]!r}. Open it as "
                         "http://127.0.0.1:<port>/, or add the name to ADAPTERLENS_ALLOWED_HOSTS.")
        raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
        target = raw_path + b"?" + scope.get("query_string", b"")
        if b"\x00" in target or b"%00" in target.lower():
            return 400, "The URL contains a NUL character (%00); no name, id or parameter value can contain one."
        length = headers.get("content-length")
        if length is not None and not (length.strip().isascii() and length.strip().isdigit()):
            return 400, "The Content-Length header is not a number."
        if length is not None and int(length) > self.max_body:
            return 413, f"The request body is larger than {self.max_body:,} bytes."
        if scope.get("method", "GET").upper() in SAFE_METHODS:
            return None
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        origin = headers.get("origin")
        referer = headers.get("referer")
        if origin is not None:
            if not same_origin(origin, host_header, self.trusted_origins):
                return 403, (f"Cross-site request refused: Origin {origin[:100]!r} is not this dashboard. "
                             "State-changing requests must come from its own pages or a trusted origin "
                             "(ADAPTERLENS_TRUSTED_ORIGINS).")
        elif referer is not None:
            parts = urlsplit(referer)
            if not same_origin(f"{parts.scheme}://{parts.netloc}", host_header, self.trusted_origins):
                return 403, "Cross-site request refused: the Referer is not a page of this dashboard."
        elif content_type in SIMPLE_TYPES:
            return 403, ("Request refused: a form-type body without an Origin or Referer header. Browsers send "
                         "one; scripts should post JSON (Content-Type: application/json).")
        if scope.get("path", "").startswith("/api/") and content_type and content_type != "application/json":
            return 415, f"The JSON API takes application/json bodies, not {content_type[:60]!r}."
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited

    def _with_headers(self, send: Send, nonce: str) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for name, value in security_headers(nonce).items():
                    if name.encode() not in names:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        return send_with_headers

    async def _answer(self, scope: Scope, send: Send, status: int, message: str, nonce: str) -> None:
        """A refusal in the caller's language: JSON under /api/, else a small page (no template, no database)."""
        if scope.get("path", "").startswith("/api/"):
            body, ctype = json.dumps({"detail": message}).encode(), "application/json"
        else:
            from markupsafe import escape

            body = (f'<!doctype html><meta charset=utf-8><link rel=icon href="data:,"><title>{status}</title>'
                    f"<h1>{status}</h1><p>{escape(message)}</p>").encode()
            ctype = "text/html; charset=utf-8"
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in security_headers(nonce).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def security_headers(nonce: str) -> dict[str, str]:
    return {
        "content-security-policy": page_policy(nonce),
        "x-content-type-options": "nosniff",
        "x-frame-options": "DENY",
        "referrer-policy": "same-origin",
        "cross-origin-resource-policy": "same-origin",
    }
