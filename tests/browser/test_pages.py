"""Navigate the seeded dashboard in Chromium: index → feature → graph, escaping, ablate form, jobs."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import shot

pytestmark = pytest.mark.browser


def test_index_feature_graph_navigation(server, world, page):
    page.goto(server.url + "/")
    assert page.url.endswith(f"/runs/{world.run_id}")
    page.wait_for_selector("[data-curves] .js-plotly-plot")  # training curves drawn by Plotly
    assert page.locator("[data-table=models] tr.model-adapted").count() == 1
    shot(page, "run")

    page.click("text=Features")
    page.wait_for_selector("[data-table=features]")
    assert page.locator("[data-table=features] tbody tr").count() == 16 * 3
    page.evaluate("document.querySelector('form[data-filters]').dataset.kept = 'yes'")  # survives a partial swap
    page.select_option("select[name=layer]", "1")
    page.check("input[name=in_set]")
    page.wait_for_url("**in_set=true**")  # the URL follows the filters (htmx pushes it)
    page.wait_for_function("document.querySelectorAll('[data-table=features] tbody tr').length == 2")
    rows = page.locator("[data-table=features] tbody tr")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.feature)")) == ["1/3", "1/5"]
    assert page.evaluate("document.querySelector('form[data-filters]').dataset.kept") == "yes"  # not reloaded
    page.fill("input[name=promotes]", "Wait")
    page.wait_for_url("**promotes=Wait**")
    page.wait_for_selector("#feature-results >> text=promotes “Wait”")
    # the results are sorted by token strength now, and the form's default-sort label says so (only the results swap)
    assert page.inner_text("select[name=sort] option[data-default-sort]") == "strength ↓ (default)"
    page.fill("input[name=promotes]", "")
    assert page.inner_text("select[name=sort] option[data-default-sort]") == "layer, index (default)"
    page.goto(page.url.split("?")[0])
    shot(page, "features")

    layer, index = world.script_feature
    page.click(f"[data-feature='{layer}/{index}'] a.fid")
    page.wait_for_selector("[data-examples=top] .example")
    page.wait_for_selector("[data-section=histogram] .js-plotly-plot")
    focus = page.locator("[data-examples=top] .example").first.locator(".tok.focus")
    assert focus.inner_text() == "<script>"  # text, not markup
    assert page.evaluate("document.querySelectorAll('.example script').length") == 0
    page.locator("[data-examples=top] .example").first.locator("[data-expand]").click()
    assert page.locator("[data-examples=top] .example.expanded").count() == 1
    focus.hover()
    assert "act" in page.locator("#tip").inner_text()
    shot(page, "feature")

    page.click("[data-section=graphs] a")
    page.wait_for_selector("body[data-graph-ready=true]")
    kinds = json.loads(page.get_attribute("[data-graph-pane]", "data-kinds"))
    assert (kinds["feature"], kinds["error"], kinds["embedding"], kinds["logit"]) == (10, 3, 15, 2)
    assert "Replacement" in page.inner_text("[data-scores]") and "frozen-mlp" in page.inner_text("[data-counts]")
    shown = int(page.get_attribute("[data-live-counts]", "data-nodes"))
    page.eval_on_selector("[data-pruning]", "el => { el.value = 0.4; el.dispatchEvent(new Event('input')); }")
    assert int(page.get_attribute("[data-live-counts]", "data-nodes")) < shown
    point = page.evaluate("window.adapterlensGraph.nodePoint('2_7_14')")
    page.mouse.click(point["x"], point["y"])
    page.wait_for_selector("[data-node-panel][data-node-id='2_7_14']")
    shot(page, "graph")
    page.click("[data-node-panel] [data-feature-link]")
    page.wait_for_url("**/features/2/7")


def test_ablation_and_experiment_and_jobs_pages(server, world, page):
    page.goto(f"{server.url}/runs/{world.run_id}/ablations/{world.ablation_id}")
    page.wait_for_selector("[data-condition=ablated] .tok")
    assert page.locator("#ablation-live").get_attribute("data-done") == "true"
    assert page.locator("[data-condition=unablated] .tok.hes").count() >= 1
    assert page.locator("[data-condition=ablated] .tok.div").first.get_attribute("data-step") == "3"
    shot(page, "ablation")

    page.goto(f"{server.url}/runs/{world.run_id}/experiments/{world.experiment_id}")
    page.wait_for_selector("[data-fig=fig-response_len].js-plotly-plot")
    shot(page, "experiment")

    page.goto(server.url + "/jobs")
    failed = page.locator(f"tr[data-job='{world.job_ids['attribute']}']")
    assert failed.get_attribute("data-status") == "failed"
    assert "CUDA out of memory <oops>" in page.locator("[data-section=failed] .error-line").inner_text()
    shot(page, "jobs")


def test_bad_ablation_request_shows_the_reason(server, world, page):
    page.allowed_errors = ["status of 422"]
    page.goto(f"{server.url}/runs/{world.run_id}/features/2/7")
    page.click("[data-ablate] summary")
    page.fill("[data-ablate] [data-features]", "2:7 99:1")
    page.check("[data-ablate] input[name=source][value=text]")
    page.fill("[data-ablate] textarea[name=prompt]", "3 + 4")
    page.click("[data-submit-ablation]")
    page.wait_for_selector("[data-error]")
    assert "99" in page.inner_text("[data-error]")
    shot(page, "ablate-refused")


def test_not_found_page(server, page):
    page.allowed_errors = ["status of 404"]
    resp = page.goto(server.url + "/runs/does-not-exist")
    assert resp.status == 404
    assert "does-not-exist" in page.inner_text(".error-message")


def test_empty_run_lights_up_nothing_and_says_what_to_run(server, world, page):
    page.goto(f"{server.url}/runs/{world.empty_run_id}")
    assert page.locator("[data-empty]").count() >= 3
    assert "adapterlens evaluate --run empty-run" in page.inner_text("[data-section=evaluation]")
    shot(page, "run-empty")
