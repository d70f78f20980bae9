"""The graph viewer in Chromium on the seeded graph: hover rings, pins and supernodes in the URL, the ledger,
ablate pinned, logit difference, and safety against hostile URLs."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest
from sqlalchemy.orm import Session

from app.db.schema import Ablation
from app.db.session import make_engine
from tests.browser.conftest import shot

pytestmark = pytest.mark.browser

READY = "body[data-graph-ready=true]"


def _open(page, server, world, query: str = "") -> None:
    page.goto(f"{server.url}/runs/{world.run_id}/graphs/{world.graph_id}{query}")
    page.wait_for_selector(READY)


def _api(server, path: str) -> dict:
    with urllib.request.urlopen(server.url + path, timeout=10) as resp:
        return json.loads(resp.read())


def _query(page) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page.url).query))


def _set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
                          str(value))


def _point(page, node_id: str) -> tuple[float, float]:
    """Where a node is drawn (nodes are canvas glyphs; the viewer scrolls the node into view)."""
    page.locator("[data-graph-pane]").scroll_into_view_if_needed()
    p = page.evaluate("id => window.adapterlensGraph.nodePoint(id)", node_id)
    assert p is not None, f"{node_id} is not drawn"
    return p["x"], p["y"]


def _hover(page, node_id: str) -> None:
    page.mouse.move(*_point(page, node_id))


def _click(page, node_id: str, pin: bool = False) -> None:
    x, y = _point(page, node_id)
    if pin:
        page.keyboard.down("Control")
    page.mouse.click(x, y)
    if pin:
        page.keyboard.up("Control")


def _shown(page) -> int:
    return int(page.get_attribute("[data-live-counts]", "data-nodes"))


def test_hover_rings_the_same_feature_at_its_other_positions(server, world, page):
    _open(page, server, world)
    _hover(page, "1_3_14")
    page.wait_for_selector("[data-rings] .ring.hovered[data-node-id='1_3_14']")
    same = page.locator("[data-rings] .ring.same").evaluate_all("rs => rs.map(r => r.dataset.nodeId)")
    assert same == ["1_3_13"]  # feature L1/3 is a node at positions 13 and 14
    assert "also at position 13" in page.inner_text("#tip")
    _hover(page, "0_2_13")  # a feature at one position: only its own ring
    page.wait_for_selector("[data-rings] .ring.hovered[data-node-id='0_2_13']")
    assert page.locator("[data-rings] .ring.same").count() == 0
    _click(page, "1_3_14")
    panel = page.locator("[data-node-panel]")
    assert panel.get_attribute("data-node-id") == "1_3_14"
    assert panel.locator("[data-feature-link]").get_attribute("href").endswith("/features/1/3")
    assert panel.locator("[data-side=input] [data-sign=negative] li").count() + \
        panel.locator("[data-side=input] [data-sign=positive] li").count() == 5
    page.wait_for_selector("[data-node-panel] [data-feature-card] .lens-row.pos code")  # fetched on click
    shot(page, "graph-viewer-clicked")


def test_pin_group_prune_and_the_copied_link_restores_the_view(server, world, page, chromium):
    _open(page, server, world)
    _click(page, "1_3_14", pin=True)
    _click(page, "2_7_14", pin=True)
    assert _query(page)["pinnedIds"] == "1_3_14,2_7_14"
    assert page.locator("[data-marks] .mark.pinned").count() == 2
    page.click("[data-group-mode]")
    page.click("[data-subgraph-body] [data-unit='1_3_14']")
    page.click("[data-subgraph-body] [data-unit='2_7_14']")
    page.fill("[data-group-label]", "say <Wait>")
    page.click("[data-make-group]")
    page.wait_for_selector("[data-subgraph-body] .sub-unit.supernode")
    assert json.loads(_query(page)["supernodes"]) == [["say <Wait>", "1_3_14", "2_7_14"]]
    _set_range(page, "[data-pruning]", 0.5)
    q = _query(page)
    assert q["pruningThreshold"] == "0.5"
    counts = page.inner_text("[data-live-counts]")
    page.click("[data-copy-link]")
    view = page.get_attribute("[data-copy-link]", "data-copied")
    assert view == page.url
    shot(page, "graph-viewer-grouped")

    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    try:
        fresh = context.new_page()
        fresh.goto(view)
        fresh.wait_for_selector(READY)
        assert _query(fresh) == q
        assert fresh.inner_text("[data-live-counts]") == counts
        assert fresh.input_value("[data-pruning]") == "0.5"
        assert sorted(fresh.locator("[data-marks] .mark.pinned").evaluate_all("ns => ns.map(n => n.dataset.nodeId)")) == \
            ["1_3_14", "2_7_14"]
        unit = fresh.locator("[data-subgraph-body] .sub-unit.supernode")
        assert unit.get_attribute("data-members") == "1_3_14,2_7_14"
        assert unit.locator(".sub-label").text_content() == "[say <Wait>]"
    finally:
        context.close()


def test_ledger_counts_match_the_filters(server, world, page):
    _open(page, server, world)
    view = _api(server, f"/api/runs/{world.run_id}/graphs/{world.graph_id}/view")
    nodes = view["nodes"]
    kinds = nodes["kind"]  # 0 feature, 1 error, 2 embedding, 3 logit
    n_total = len(nodes["id"]) + 1  # + the virtual logit-difference node (the graph's default)
    assert _shown(page) == n_total
    for t in (0.6, 0.35):
        _set_range(page, "[data-pruning]", t)
        hidden = sum(1 for k, inf in zip(kinds, nodes["influence"], strict=True) if k in (0, 1) and inf > t)
        errors = sum(1 for k, inf in zip(kinds, nodes["influence"], strict=True) if k == 1 and inf > t)
        item = page.locator("[data-ledger-item=pruning]")
        assert int(item.get_attribute("data-count")) == hidden > 0
        assert f"{errors} of them error nodes" in item.inner_text() or errors == 0
        assert _shown(page) == n_total - hidden
        assert page.get_attribute("[data-live-counts]", "data-nodes") == str(n_total - hidden)
    _set_range(page, "[data-pruning]", 0.8)
    assert page.locator("[data-ledger-item=pruning]").count() == 0
    # density: features firing on more than d of tokens are hidden (the features table's frequency)
    _set_range(page, "[data-density]", 0.5)
    d = float(_query(page)["densityThreshold"])
    freq = {k: f["frequency"] for k, f in view["features"].items()}
    keys = [f"{layer}/{index}" for k, layer, index in zip(kinds, nodes["layer"], nodes["index"], strict=True) if k == 0]
    dense = sum(1 for key in keys if freq[key] > d)
    assert dense > 0
    assert int(page.get_attribute("[data-ledger-item=density]", "data-count")) == dense
    assert _shown(page) == n_total - dense
    shot(page, "graph-viewer-ledger")


def test_ablate_pinned_submits_exactly_those_features(server, world, page, seeded):
    _open(page, server, world)
    for nid in ("1_3_14", "1_3_13", "2_9_14"):
        _click(page, nid, pin=True)
    _click(page, "0_-1_14", pin=True)  # an error node: no feature to ablate
    assert page.locator("[data-ap-feature]").evaluate_all("cs => cs.map(c => c.dataset.apFeature)") == ["1:3", "2:9"]
    page.select_option("[data-ap-positions]", "prompt")
    page.click("[data-ablate-pinned-submit]")
    page.wait_for_selector("[data-ap-result] [data-ablation-link]")
    ablation_id = int(page.get_attribute("[data-ap-result]", "data-ablation-id"))
    data = _api(server, f"/api/runs/{world.run_id}/ablations/{ablation_id}")
    req = data["ablation"]["request"]
    assert req["features"] == [[1, 3], [2, 9]] and req["positions"] == "prompt" and req["mode"] == "zero"
    graph = _api(server, f"/api/runs/{world.run_id}/graphs/{world.graph_id}")
    assert graph["ablate"]["prompt_id"] is not None and graph["ablate"]["prompt_tokens"] == graph["position"] + 1
    # the worker's report on the target token shows up when the ablation is done (written here as it would)
    engine = make_engine(seeded[0])
    try:
        with Session(engine) as s, s.begin():
            row = s.get(Ablation, ablation_id)
            stored = row.request["request"]  # the graph's own ids (never text), cut at its position, its target
            assert (stored["prompt_id"], stored["prompt_tokens"], stored["target_token_id"]) == \
                (graph["ablate"]["prompt_id"], graph["position"] + 1, graph["target_token_id"])
            assert stored["prompt"] is None
            row.status = "done"
            row.summary = {"target": {"token_id": graph["target_token_id"], "text": " Wait",
                                      "unablated": {"p_first": 0.41, "first": True, "produced": True},
                                      "ablated": {"p_first": 0.02, "first": False, "produced": False}}}
    finally:
        engine.dispose()
    page.wait_for_selector("[data-ap-result] [data-ap-target]")
    assert "ablated: p(first) 0.020, never produced" in page.inner_text("[data-ap-target]")
    shot(page, "graph-viewer-ablate")


def test_logit_difference_and_hostile_urls(server, world, page):
    _open(page, server, world)  # the graph's default logit difference: " Wait" − "7"
    assert json.loads(page.get_attribute("[data-graph-pane]", "data-kinds"))["diff"] == 1
    assert _query(page)["logitDiff"] == " Wait__vs__7"
    _click(page, "logit-diff")
    inputs = page.locator("[data-node-panel] [data-side=input] li.conn").count()
    assert inputs > 0
    page.select_option("[data-logit-diff]", "")
    assert "diff" not in json.loads(page.get_attribute("[data-graph-pane]", "data-kinds"))
    assert "logitDiff" not in _query(page)

    page.console_messages = []
    hostile = ("?supernodes=%5B%5B&clerps=%7Bnot-json&pinnedIds=nope,1_3_14&pruningThreshold=7"
               "&clickedId=2_7_14&logitDiff=a__vs__b")
    _open(page, server, world, hostile)
    assert page.locator("[data-marks] .mark.pinned").count() == 1  # the unknown id is ignored, the real one pinned
    assert page.input_value("[data-pruning]") == "0.8"  # out-of-range threshold ignored
    evil = urllib.parse.quote(json.dumps([["1_3_14", "<img src=x id=pwned>"]]))
    groups = urllib.parse.quote(json.dumps([["<script>alert(1)</script>", "1_3_14", "2_7_14"]]))
    _open(page, server, world, f"?clerps={evil}&pinnedIds=1_3_14,2_7_14&supernodes={groups}&clickedId=1_3_14")
    assert page.locator("#pwned").count() == 0 and page.locator("[data-node-panel] img").count() == 0
    assert "<img src=x id=pwned>" in page.inner_text("[data-node-panel] [data-np-label]")
    group = page.locator("[data-subgraph-body] .sub-unit.supernode")
    assert group.locator("title").text_content().startswith("[<script>alert(1)</script>] ")
    assert page.locator("script:has-text('alert(1)')").count() == 0
    _hover(page, "1_3_14")
    assert "<img src=x id=pwned>" in page.inner_text("#tip")
