"""Navigate the seeded dashboard in Chromium: index → feature → graph, escaping, ablate form, jobs."""

from __future__ import annotations

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
    page.wait_for_selector("[data-graph] svg .node[data-kind=feature]")
    n_feature_nodes = page.locator("svg .node[data-kind=feature]").count()
    assert n_feature_nodes == 8
    visible_edges = page.evaluate("[...document.querySelectorAll('svg .edge')].filter(e => e.style.display !== 'none').length")
    page.fill("[data-threshold]", "0.9")
    page.dispatch_event("[data-threshold]", "input")
    fewer = page.evaluate("[...document.querySelectorAll('svg .edge')].filter(e => e.style.display !== 'none').length")
    assert fewer < visible_edges
    page.fill("[data-threshold]", "0.05")
    page.dispatch_event("[data-threshold]", "input")
    page.check("[data-pick-mode]")
    page.click("svg .node[data-layer='2'][data-index='7']")
    assert "2:7" in page.input_value("[data-ablate] [data-features]")
    page.uncheck("[data-pick-mode]")
    shot(page, "graph")
    page.click("svg .node[data-layer='1'][data-index='3']")
    page.wait_for_url("**/features/1/3")


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
