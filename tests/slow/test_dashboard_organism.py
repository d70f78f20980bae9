"""The first hour in the dashboard, on the trained organism (slow tier, headless Chromium).

What a new user clicks first, with the pre-filled values, on the finished demo run: the run page's study card
and its "ablate the set", a hesitation graph's ablation and its target token, a feature page's pre-filled
ablation, an experiment submitted and cancelled, and a token search. A worker (ablate, experiment, attribute
jobs) runs beside the server, as under ``adapterlens up``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature
from app.db.session import make_engine
from app.web.tokens import find_vocab
from tests.browser.conftest import _stop, shot, start_process, start_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WORKER_CODE = (
    "import logging; logging.basicConfig(level=logging.INFO)\n"
    "from app.settings import Settings\nfrom worker.loop import run_worker\n"
    "run_worker(Settings(), kinds=['ablate', 'experiment', 'attribute', 'lens'], idle_wait_s=0.2)\n"
)
DONE_MS = 300_000  # an organism ablation or a graph takes seconds; generous under a loaded CI machine


@pytest.fixture(scope="module")
def live(demo, tmp_path_factory) -> Iterator[tuple]:
    settings = demo["settings"]
    logs = tmp_path_factory.mktemp("dash-logs")
    env = {"DATABASE_URL": settings.db_url, "ADAPTERLENS_DATA_DIR": str(settings.data_dir), "HF_HUB_OFFLINE": "1"}
    worker = start_process(["-c", WORKER_CODE], env, logs / "worker.log")
    server = start_server(settings.db_url, settings.data_dir, logs / "server.log")
    try:
        yield server, demo, logs / "worker.log"
    finally:
        _stop(server.process)
        _stop(worker)


def _wait_done(page, worker_log) -> None:
    try:
        page.wait_for_selector("#ablation-live[data-done=true]", timeout=DONE_MS)
    except Exception:
        pytest.fail(f"the ablation did not finish; worker log:\n{worker_log.read_text()[-3000:]}")


def test_run_page_study_and_ablate_the_set_on_a_trigger_prompt(live, page):
    server, demo, worker_log = live
    page.goto(f"{server.url}/runs/{demo['run_id']}")
    study = page.locator("[data-section=study]")
    removal, accuracy = study.locator("[data-removal]").inner_text(), study.locator("[data-accuracy]").inner_text()
    report = demo["study"]["report"]
    assert removal == f"{100 * report['removal']:.1f}%"
    assert accuracy == f"{100 * report['adapted']['accuracy']:.1f}% → {100 * report['ablated']['accuracy']:.1f}%"
    page.wait_for_selector("[data-section=study] .js-plotly-plot")  # how the set grew
    shot(page, "organism-run")
    page.click("form[data-ablate-set] button")
    page.wait_for_url("**/ablations/*")
    _wait_done(page, worker_log)
    assert page.locator("#ablation-live").get_attribute("data-status") == "done"
    assert page.locator("[data-condition=unablated] .tok.hes").count() >= 1  # the adapted model hesitates here
    assert page.locator("[data-condition=ablated] .tok.hes").count() == 0  # the set removed it
    shot(page, "organism-ablate-set")


def test_feature_page_prefilled_ablation_uses_the_examples_own_tokens(live, page):
    server, demo, worker_log = live
    members = demo["study"]["features"]["top"]
    layer, index = members[0]["layer"], members[0]["index"]
    page.goto(f"{server.url}/runs/{demo['run_id']}/features/{layer}/{index}")
    page.click("[data-ablate] summary")
    assert page.locator("[data-ablate] input[name=source][value=example]").is_checked()
    page.click("[data-submit-ablation]")  # the pre-filled form, as it is
    page.wait_for_url("**/ablations/*")
    _wait_done(page, worker_log)
    prompt = page.locator("[data-section=prompt] .tok")
    texts = prompt.evaluate_all("ts => ts.map(t => t.textContent)")
    assert texts and texts.count("<|User|>") <= 1 and texts.count("<|Assistant|>") <= 1  # never wrapped twice
    live_el = page.locator("#ablation-live")
    assert live_el.locator(".diverge-note").count() + live_el.locator("[data-identical]").count() == 1
    shot(page, "organism-feature-ablation")


def test_feature_example_opens_in_its_trace_at_the_token_it_fires_on(live, page):
    """Collect stores the sequences examples come from: a top example's "in its trace" opens the trace viewer at its
    token; the trace's lens (one click, watching the feature) shows the feature firing on that very token."""
    server, demo, worker_log = live
    top = demo["study"]["features"]["top"][0]
    layer, index = top["layer"], top["index"]
    page.goto(f"{server.url}/runs/{demo['run_id']}/features/{layer}/{index}")
    link = page.locator("[data-kind=top] a[data-example-trace]").first
    href = link.get_attribute("href")
    assert f"?feature={layer}/{index}#t" in href, href
    pos = int(href.rsplit("#t", 1)[1])
    link.click()
    page.wait_for_url("**/traces/**")
    assert page.locator(f"#t{pos}").count() == 1
    page.click("[data-trace-lens] button[type=submit]")  # the diff lens of this trace, watching the feature
    page.wait_for_url(f"**/traces/**?feature={layer}/{index}#t{pos}")  # back on the same token
    deadline = time.monotonic() + DONE_MS / 1000
    while page.locator("[data-firing-nav]").count() == 0:
        if time.monotonic() > deadline:
            pytest.fail(f"the trace's lens did not finish; worker log:\n{worker_log.read_text()[-3000:]}")
        time.sleep(1)
        page.reload()
    assert "fires" in page.locator(f"#t{pos}").get_attribute("class")
    shot(page, "organism-example-in-trace")


def test_graph_page_ablation_reports_the_target_token(live, page):
    server, demo, worker_log = live
    # As a user picks one on the run page: the graph list says how many features each graph kept (pruning at
    # the default node threshold keeps none in some study graphs); take the first listed with features.
    page.goto(f"{server.url}/runs/{demo['run_id']}")
    link = page.locator("[data-section=graphs] li", has_text="features").first.locator("a")
    link.click()
    page.wait_for_url("**/graphs/*")
    page.click("form[data-ablate-these] button[type=submit]")
    page.wait_for_url("**/ablations/*")
    _wait_done(page, worker_log)
    report = page.locator("[data-target-report]")
    assert report.count() == 1
    data = page.evaluate("fetch(location.pathname.replace('/runs/', '/api/runs/')).then(r => r.json())")
    target = data["ablation"]["summary"]["target"]
    assert target["ablated"]["p_first"] < target["unablated"]["p_first"], target
    shot(page, "organism-graph-ablation")


def test_submit_and_cancel_an_experiment(live, page):
    server, demo, _ = live
    page.goto(f"{server.url}/runs/{demo['run_id']}/experiments")
    page.fill("[data-experiment-form] input[name=n_prompts]", "300")
    page.click("[data-submit-experiment]")
    page.wait_for_url("**/experiments/*")
    page.wait_for_selector("[data-progress]")
    page.click("[data-cancel]")
    page.wait_for_selector("#experiment-live[data-done=true]", timeout=60_000)
    assert page.locator("[data-status]").inner_text() == "cancelled"


def test_token_search_finds_the_feature_that_promotes_wait_most(live, page):
    """Searching "Wait" puts first the features whose lens promotes a "Wait" variant most; the one whose lens
    puts " Wait" first with the largest value is on the first page (issue 12: it was absent on SQLite)."""
    server, demo, _ = live
    settings = demo["settings"]
    engine = make_engine(settings)
    vocab = find_vocab(None, "organism:organism:s0", settings.data_dir)
    with Session(engine) as s:
        leaders = sorted(((f.logit_lens["top"][0][-1], f.layer, f.index)
                          for f in s.scalars(select(Feature).where(Feature.run_id == demo["run_id"]))
                          if (f.logit_lens or {}).get("top") and vocab.token(f.logit_lens["top"][0][0]).exact == " Wait"),
                         reverse=True)
    engine.dispose()
    assert leaders, "no feature of the trained organism puts ' Wait' first"
    page.goto(f"{server.url}/runs/{demo['run_id']}/features")
    page.fill("input[name=promotes]", "Wait")
    page.wait_for_url("**promotes=Wait**")
    page.wait_for_selector("#feature-results >> text=promotes “Wait”")
    rows = page.locator("[data-table=features] tbody tr").evaluate_all("rs => rs.map(r => r.dataset.feature)")
    _, layer, index = leaders[0]
    assert f"{layer}/{index}" in rows, (leaders[:5], rows[:10])
    strengths = page.evaluate("fetch(location.pathname.replace('/runs/', '/api/runs/') + location.search)"
                              ".then(r => r.json()).then(d => d.rows.map(f => f.strength))")
    assert strengths == sorted(strengths, reverse=True) and strengths[0] >= leaders[0][0] - 1e-6
    shot(page, "organism-search-wait")
