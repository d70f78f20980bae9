"""Feature labels in Chromium: the run page's category plot, and a label search in the feature index (its own
store: the seeded world labelled by the built-in labeler, so the shared seeded server is left as it is)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest

from app.db.migrate import upgrade
from app.db.session import make_engine
from app.labels.run import label_run
from tests.browser.conftest import Server, _stop, shot, start_server
from tests.seed import seed_world

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    root = tmp_path_factory.mktemp("labels-db")
    url = f"sqlite:///{root / 'adapterlens.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        world = seed_world(engine, root / "tokenizer")
        label_run(engine, world.run_id)
    finally:
        engine.dispose()
    server = start_server(url, root, root / "server.log")
    try:
        yield server, world.run_id
    finally:
        _stop(server.process)


def test_category_plot_and_label_search(labelled, page):
    server, rid = labelled
    api = json.load(urllib.request.urlopen(f"{server.url}/api/runs/{rid}"))["categories"]
    page.goto(f"{server.url}/runs/{rid}")
    page.wait_for_selector("[data-categories-plot].js-plotly-plot")  # Plotly drew into the div
    traces = page.evaluate("document.querySelector('[data-categories-plot]').data.map(t => [t.name, t.x.length])")
    assert traces == [[c["category"], 1 + len(api["layers"])] for c in api["overall"]]  # "all" + one bar per layer
    assert "built-in rules" in page.inner_text("[data-judge]")
    assert "about 8%" in page.inner_text("[data-reasoning-share]")
    assert "not a 7B reasoning model" in page.inner_text("[data-caveat]")
    shot(page, "run-categories")

    page.goto(f"{server.url}/runs/{rid}/features")
    page.fill("input[name=q]", "wait")
    page.wait_for_url("**q=wait**")
    want = json.load(urllib.request.urlopen(f"{server.url}/api/runs/{rid}/features?q=wait&limit=500"))["rows"]
    assert want, "no seeded feature is labelled with Wait"
    page.wait_for_function(f"document.querySelectorAll('[data-table=features] tbody tr').length == {len(want)}")
    labels = page.locator("[data-table=features] tbody td.label").all_inner_texts()
    assert labels and all("wait" in t.lower() for t in labels)
    shown = set(page.locator("[data-table=features] tbody tr").evaluate_all("rs => rs.map(r => r.dataset.feature)"))
    assert shown == {f"{r['layer']}/{r['index']}" for r in want}
    shot(page, "features-label-search")
    page.click("[data-table=features] tbody tr a.fid")
    page.wait_for_selector("[data-labels] [data-label-source=builtin]")
    assert "wait" in page.inner_text("[data-labels]").lower()
