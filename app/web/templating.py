"""Jinja2 for the pages: the environment (autoescape on, strict undefined) and its filters and helpers.

Token text is only ever escaped (autoescape, or ``markupsafe.escape`` in :func:`token_spans`, the same
function); helpers that return ``Markup`` build the rest of it from numbers and fixed class names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape
from pydantic_core import to_jsonable_python
from starlette.routing import NoMatchFound

if TYPE_CHECKING:
    from fastapi import FastAPI

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


def duration(seconds: Any, compact: bool = False) -> str:
    """Seconds for people: 42 s, 3 min 05 s, 1 h 07 min (``compact``, for a terminal line: 42s, 3m05s, 1h07m)."""
    if seconds is None:
        return "–"
    s = int(round(float(seconds)))
    sec, mins, hours = ("s", "m", "h") if compact else (" s", " min ", " h ")
    if s < 60:
        return f"{s}{sec}"
    if s < 3600:
        return f"{s // 60}{mins}{s % 60:02d}{sec}"
    return f"{s // 3600}{hours}{(s % 3600) // 60:02d}{'m' if compact else ' min'}"


def pct(value: Any) -> str:
    if value is None:
        return "–"
    return f"{100 * float(value):.1f}%"


def shade(act: float | None, max_act: float | None) -> str:
    """Opacity (0–1) of a token's highlight: its activation relative to the feature's maximum."""
    if not act or not max_act or max_act <= 0:
        return "0"
    return f"{min(1.0, max(0.0, float(act) / float(max_act))):.3f}"


_ELLIPSIS = '<span class="ell">…</span>'


def token_spans(ex: Any, max_act: float | None) -> Markup:
    """An example's tokens as HTML for ``_tokens.html``: one ``<span class="tok …">`` per token (classes for
    the focus, outside the shown window, active, newline, token kind, hesitation; the shade, the activation and
    the next token as attributes), ``…`` around the shown window.

    A feature page shows thousands of tokens; a Jinja loop escaping each value spent most of the page's
    render time (issue 17), so the markup is built here in one pass. Every token text goes through
    ``markupsafe.escape`` (the function autoescape applies), once per token; class, shade and activation are
    generated from numbers and fixed names.
    """
    lo, hi = ex.window
    tokens = ex.tokens
    kinds = getattr(ex, "token_kinds", None) or []
    marks = getattr(ex, "hesitation", None) or []
    n = len(tokens)
    shown = [_shown(t) for t in tokens]
    parts = []
    for i, act in enumerate(ex.acts[:n]):
        cls = "tok"
        if i == ex.focus:
            cls += " focus"
        if i < lo or i >= hi:
            cls += " out"
        if act > 0:
            cls += " on"
        if "\n" in tokens[i]:
            cls += " nl"
        if i < len(kinds) and kinds[i] != "text":
            cls += " " + kinds[i]  # special / bytes / padding: styled apart
        if i < len(marks) and marks[i]:
            cls += " hes"
        if i == lo and lo > 0:
            parts.append(_ELLIPSIS)
        a = shade(act, max_act)
        style = f' style="--a:{a}"' if a != "0" else ""
        nxt = shown[i + 1] if i + 1 < n else "(end of the example)"
        parts.append(f'<span class="{cls}"{style} data-act="{fmt(act) if act else "0"}" data-next="{nxt}">'
                     f"{shown[i]}</span>")
        if i == hi - 1 and hi < n:
            parts.append(_ELLIPSIS)
    return Markup("".join(parts))


CHUNK_MIN, CHUNK_MAX = 200, 1000  # tokens per block of a trace's strip (see trace_spans)


def trace_spans(page: Any, why_prefix: str, graph_prefix: str) -> Markup:
    """A trace's strip (``trace.html``) as HTML built in one pass, as :func:`token_spans` does for examples: one
    ``<span id="tN" class="tok …">`` per token (hesitation outlined, kind, chat region, firing), the shade and its
    value as attributes, and a "why here?" link after each hesitation token (its graph, else the queue page).
    Token texts and region names go through ``markupsafe.escape``; the rest is numbers and fixed names."""
    m = page.shade_max
    firing = page.shade == "feature"
    parts = ['<div class="trace-chunk">']
    in_chunk = 0
    for t in page.tokens:
        # blocks of tokens the browser lays out only near the viewport (content-visibility): a block ends after
        # a newline token once it holds CHUNK_MIN tokens, or at CHUNK_MAX (a long trace renders in a fraction)
        if in_chunk >= CHUNK_MAX or (in_chunk >= CHUNK_MIN and "\n" in page.tokens[t.pos - 1].text):
            parts.append('</div><div class="trace-chunk">')
            in_chunk = 0
        in_chunk += 1
        cls = "tok"
        if t.hesitation:
            cls += " hes outlined"
        if t.kind != "text":
            cls += " " + t.kind
        if t.region:
            cls += " r-" + str(escape(t.region))
        if firing and t.value is not None and t.value > 0:
            cls += " fires"
        attrs = ""
        if t.value is not None and m:
            attrs = f' style="--v:{shade(t.value, m)}" data-tip="{page.shade} {fmt(t.value)}"'
        parts.append(f'<span id="t{t.pos}" class="{cls}"{attrs} data-pos="{t.pos}">{escape(visible(t.text))}</span>')
        if t.hesitation and t.pos > 0:
            if t.graph_id:
                parts.append(f'<a class="why has-graph" data-why="{t.pos}" href="{graph_prefix}{t.graph_id}" '
                             'title="why here? its attribution graph">?</a>')
            else:
                parts.append(f'<a class="why" data-why="{t.pos}" href="{why_prefix}{t.pos}" '
                             'title="why here? queue an attribution graph of this token">?</a>')
    parts.append("</div>")
    return Markup("".join(parts))


def trace_minimap(page: Any) -> dict[str, Any]:
    """What ``static/js/trace.js`` draws the minimap from: each token's shade (0–1, or null), the hesitation
    tokens and, shaded by a feature, the tokens where it fires."""
    m = page.shade_max
    return {"n": len(page.tokens), "shade": page.shade,
            "v": [float(shade(t.value, m)) if t.value is not None and m else None for t in page.tokens],
            "hes": [t.pos for t in page.tokens if t.hesitation],
            "fires": [t.pos for t in page.tokens if page.shade == "feature" and t.value is not None and t.value > 0]}


def visible(text: str) -> str:
    """Token text with layout characters made visible (a newline token must not vanish)."""
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") if text else "∅"


@lru_cache(maxsize=1 << 16)
def _shown(text: str) -> str:
    """A token text as example markup shows it: :func:`visible`, then escaped. A vocabulary's texts repeat on
    every page, so each is escaped once per process (a page escaped thousands of tokens, ~7% of its time)."""
    return str(escape(visible(text)))


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


def with_marker(fig: dict[str, Any], x: float | None, label: str) -> dict[str, Any]:
    """``fig`` with a vertical marker line at ``x`` (a scatter trace, so it sits right on log axes too)."""
    if x is None or not x > 0:
        return fig
    top = max([float(c) for c in fig["data"][0].get("y") or [0]] + [1.0])
    marker = {"type": "scatter", "mode": "lines+markers", "x": [x, x], "y": [0, top], "name": label,
              "line": {"color": "#1f3a93", "width": 2, "dash": "dot"}, "marker": {"size": 6},
              "hovertemplate": f"{label}: %{{x:.3g}}<extra></extra>"}
    layout = {**fig.get("layout", {}), "showlegend": True}
    return {"data": [{**fig["data"][0], "name": "collected tokens"}, *fig["data"][1:], marker], "layout": layout}


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(to_jsonable_python(obj), **kwargs)


def _named_routes(routes: Any) -> Any:
    """The named routes under ``routes``, including those of routers that FastAPI keeps as included routers (their
    ``effective_route_contexts`` carry the prefix)."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            yield from _named_routes(contexts())
        elif getattr(route, "name", None):
            yield route


def route_paths(app: FastAPI) -> Callable[..., str]:
    """``path(name, **params)`` for templates: the URL path of a named route. Starlette's ``url_path_for`` tries
    every route in turn (a hundred here), which was ~10% of a feature page's time with its dozens of links; this
    finds the route by name in a dict (built on first use, once every route is added) and asks it alone. A name
    it cannot resolve that way goes to Starlette's search, which raises its usual error."""
    by_name: dict[str, Any] = {}

    def path(name: str, **params: Any) -> str:
        if not by_name:
            for route in _named_routes(app.router.routes):
                by_name.setdefault(route.name, route)
        text_params = {k: str(v) for k, v in params.items()}
        route = by_name.get(name)
        if route is not None:
            try:
                return route.url_path_for(name, **text_params)
            except NoMatchFound:
                pass
        return app.url_path_for(name, **text_params)

    return path


def build_templates(app: FastAPI, templates_dir: str, htmx_src: str, plotly_src: str) -> Jinja2Templates:
    """The page renderer of ``app``: ``path()`` in templates builds URLs from route names."""
    env = Environment(
        loader=FileSystemLoader(templates_dir),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt=fmt, pct=pct, visible=visible, duration=duration)
    env.policies["json.dumps_function"] = _dumps  # |tojson takes pydantic models too
    env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    env.globals.update(
        shade=shade,
        hist_traces=hist_traces,
        hist_fig=hist_fig,
        with_marker=with_marker,
        token_spans=token_spans,
        trace_spans=trace_spans,
        trace_minimap=trace_minimap,
        path=route_paths(app),
        qs=lambda params: ("?" + urlencode(params)) if params else "",
        htmx_src=htmx_src,
        plotly_src=plotly_src,
    )
    return Jinja2Templates(env=env)
