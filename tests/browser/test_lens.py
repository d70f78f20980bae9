"""The diff lens in Chromium with a real worker over the tiny trained organism run: paste a text, see the KL strip,
toggle it, click a token and see its panel; then "test your text" on a feature page and its histogram marker."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, Run
from app.db.session import make_engine
from tests.browser.conftest import _stop, shot, start_process, start_server

pytestmark = pytest.mark.browser

WORKER_CODE = (
    "import logging; logging.basicConfig(level=logging.INFO)\n"
    "from app.settings import Settings\nfrom worker.loop import run_worker\n"
    "run_worker(Settings(), kinds=['lens'], handler_modules=['worker.lens.job'], idle_wait_s=0.2)\n"
)
FEATURE = (0, 1)


@pytest.fixture
def live(tiny_run_settings, tmp_path):
    """The server and one lens worker over a copy of the tiny run's store, with one feature row (its page)."""
    db = tmp_path / "adapterlens.db"
    shutil.copy(tiny_run_settings.data_dir / "adapterlens.db", db)
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        run_id = s.scalar(select(Run.id).order_by(Run.id).limit(1))
        s.merge(Feature(run_id=run_id, layer=FEATURE[0], index=FEATURE[1], frequency=0.1, max_act=2.0, mean_act=0.5,
                        histogram={"edges": [0.01, 0.1, 1.0, 10.0], "counts": [40, 20, 5]}))
    engine.dispose()
    env = {"DATABASE_URL": url, "ADAPTERLENS_DATA_DIR": str(tiny_run_settings.data_dir), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    worker = start_process(["-c", WORKER_CODE], env, tmp_path / "worker.log")
    server = start_server(url, tiny_run_settings.data_dir, tmp_path / "server.log")
    try:
        yield server, run_id, tmp_path / "worker.log"
    finally:
        _stop(server.process)
        _stop(worker)


def test_lens_strip_toggle_and_panel_then_test_your_text(live, page):
    server, run_id, worker_log = live
    page.goto(f"{server.url}/runs/{run_id}")
    page.click("nav.topnav a:has-text('Lens')")
    page.wait_for_url(f"**/runs/{run_id}/lens")
    page.fill("[data-lens-form] textarea[name=prompt]", "86 + 87 = ?")
    page.click("[data-submit-lens]")
    page.wait_for_url(lambda url: f"/runs/{run_id}/lens/" in url)
    try:
        page.wait_for_selector("#lens-live[data-done=true] [data-strip] .tok", timeout=120_000)
    except Exception:
        pytest.fail(f"the lens did not finish; worker log:\n{worker_log.read_text()[-3000:]}")
    strip = page.locator("[data-strip]")
    n = page.locator("[data-strip] .tok").count()
    assert n > 5 and strip.get_attribute("data-kl") == "hybrid"
    colours = "() => [...document.querySelectorAll('[data-strip] .tok')].map(e => getComputedStyle(e).backgroundColor)"
    shaded = page.evaluate(colours)
    page.click("[data-kl-toggle=adapted]")
    assert strip.get_attribute("data-kl") == "adapted" and "kl=adapted" in page.url  # toggled in place
    assert page.evaluate(colours) != shaded
    page.locator("[data-strip] .tok").nth(3).click()
    page.wait_for_selector("#lens-panel[data-pos='3']")
    assert page.locator("#lens-panel [data-model=target] .lens-row").count() == 5
    assert page.locator("#lens-panel [data-model=adapted] .lens-row").count() == 5
    assert page.locator("#lens-panel [data-position-features] tr[data-feature]").count() > 0
    assert "pos=3" in page.url
    shot(page, "lens")

    layer, index = FEATURE
    page.goto(f"{server.url}/runs/{run_id}/features/{layer}/{index}")
    page.fill("[data-test-text-form] textarea[name=prompt]", "86 + 87 = ?")
    page.click("[data-submit-test]")
    page.wait_for_url(lambda url: f"/features/{layer}/{index}" in url and "lens=" in url)
    page.wait_for_selector("[data-text-test][data-done=true]", timeout=120_000)
    assert page.locator("[data-text-tokens] .tok").count() == n  # the same text, the same tokens
    page.wait_for_function("() => { const d = document.querySelector('[data-fig=fig-hist]'); return d && d.data; }")
    names = page.evaluate("document.querySelector('[data-fig=fig-hist]').data.map(t => t.name)")  # drawn by Plotly
    fired = page.locator("[data-text-max]").count() == 1
    assert ("your text (max)" in names) == fired
    shot(page, "feature-test-text")
