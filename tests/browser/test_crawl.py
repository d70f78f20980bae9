"""A crawl of every page of a finished demo run in Chromium: 0 server errors, 0 console errors, 0 off-site requests.

The tiny organism's demo pipeline has run through a worker (``tiny_demo``), with an ablation, an experiment and
an attribution graph requested as a user would. Starting at ``/`` (and ``/docs``, ``/redoc``), every same-origin
link is followed, a few pages per kind of URL (feature pages are many and alike).
"""

from __future__ import annotations

import re
from collections import deque
from urllib.parse import urljoin, urlsplit

import pytest

from tests.browser.conftest import _stop, start_server

pytestmark = pytest.mark.browser

PER_PATTERN = 3  # pages visited per URL shape (digits replaced), so a crawl stays short
MAX_PAGES = 150
DOWNLOADS = re.compile(r"\.(json|jsonl|csv|js|css|png|svg)(\?|$)|/vendor/|/static/")


def _shape(path: str) -> str:
    return re.sub(r"\d+", "N", path.split("?")[0]) + ("?" if "?" in path else "")


def test_every_page_of_a_finished_demo_run(tiny_demo, chromium, tmp_path):
    settings = tiny_demo["settings"]
    server = start_server(settings.db_url, settings.data_dir, tmp_path / "server.log")
    origin = urlsplit(server.url).netloc
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    offsite: list[str] = []
    errors: list[str] = []
    statuses: dict[str, int] = {}

    def route(r):
        if urlsplit(r.request.url).netloc not in (origin, ""):
            offsite.append(r.request.url)
            return r.abort()
        return r.continue_()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("console", lambda m: errors.append(f"{page.url}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
    page.on("response", lambda r: statuses.__setitem__(r.url, r.status))
    run = tiny_demo["run_id"]
    start = ["/", "/docs", "/redoc", "/jobs", f"/runs/{run}/experiments/{tiny_demo['experiment_id']}",
             *(f"/runs/{run}/ablations/{a}" for a in tiny_demo["ablation_ids"])]
    todo, seen, shapes = deque(start), set(start), {}
    visited = []
    try:
        while todo and len(visited) < MAX_PAGES:
            path = todo.popleft()
            resp = page.goto(server.url + path, wait_until="networkidle")
            visited.append((path, resp.status if resp else None))
            for href in page.eval_on_selector_all("a[href]", "as => as.map(a => a.getAttribute('href'))"):
                url = urlsplit(urljoin(server.url + path, href))
                if url.netloc != origin or DOWNLOADS.search(url.path) or url.path.startswith("/api/"):
                    continue
                nxt = url.path + (f"?{url.query}" if url.query else "")
                shape = _shape(nxt)
                if nxt in seen or shapes.get(shape, 0) >= PER_PATTERN:
                    continue
                seen.add(nxt)
                shapes[shape] = shapes.get(shape, 0) + 1
                todo.append(nxt)
    finally:
        context.close()
        _stop(server.process)
    server_errors = {u: s for u, s in statuses.items() if s >= 500}
    assert len(visited) >= 15, visited
    kinds = {_shape(p) for p, _ in visited}
    for must in ("/runs/N", "/runs/N/features", "/runs/N/features/N/N", "/runs/N/graphs/N", "/runs/N/ablations/N",
                 "/runs/N/experiments/N", "/runs/N/sets/N", "/jobs", "/docs"):
        assert must in kinds, (must, sorted(kinds))
    assert not server_errors, server_errors
    assert not [(p, s) for p, s in visited if s is None or s >= 400], visited
    assert not errors, errors
    assert not offsite, offsite
