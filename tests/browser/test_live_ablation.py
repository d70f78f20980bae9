"""Submit an ablation in Chromium and watch a real worker's tokens appear (the tiny trained organism run)."""

from __future__ import annotations

import pytest

from tests.browser.conftest import ROOT, _stop, shot, start_process, start_server

pytestmark = pytest.mark.browser

WORKER_CODE = (
    "import logging; logging.basicConfig(level=logging.INFO)\n"
    "from app.settings import Settings\nfrom worker.loop import run_worker\n"
    "run_worker(Settings(), kinds=['ablate'], handler_modules=['worker.ablation.job'], idle_wait_s=0.2)\n"
)


@pytest.fixture
def live(tiny_run_settings, tmp_path):
    """The server and one worker (ablate jobs only) over the tiny run's store."""
    env = {"DATABASE_URL": tiny_run_settings.db_url, "ADAPTERLENS_DATA_DIR": str(tiny_run_settings.data_dir),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = start_process(["-c", WORKER_CODE], env, tmp_path / "worker.log")
    server = start_server(tiny_run_settings.db_url, tiny_run_settings.data_dir, tmp_path / "server.log")
    try:
        yield server, worker, tmp_path / "worker.log"
    finally:
        _stop(server.process)
        _stop(worker)


def test_submit_ablation_and_watch_tokens_arrive(live, page):
    server, worker, worker_log = live
    page.goto(server.url + "/runs/1/ablations")
    page.fill("[data-ablate] [data-features]", "0:1 0:2 1:0")
    page.fill("[data-ablate] textarea[name=prompt]", "86 + 87 = ?")
    page.fill("[data-ablate] input[name=max_new_tokens]", "24")
    page.check("[data-ablate] input[name=compare][value=target]")
    page.click("[data-submit-ablation]")
    page.wait_for_url("**/runs/1/ablations/*")
    assert "/live" not in page.url
    done_at_load = page.locator("#ablation-live").get_attribute("data-done") == "true"
    page.evaluate("window.swaps = 0; document.body.addEventListener('htmx:afterSwap', () => window.swaps++)")
    try:
        page.wait_for_selector("#ablation-live[data-done=true]", timeout=120_000)
    except Exception:
        pytest.fail(f"the ablation did not finish; worker log:\n{worker_log.read_text()[-3000:]}")
    assert worker.poll() is None, worker_log.read_text()
    assert done_at_load or page.evaluate("window.swaps") >= 1  # the tokens came in by polling, no reload
    ablated = page.locator("[data-condition=ablated] .tok")
    unablated = page.locator("[data-condition=unablated] .tok")
    assert ablated.count() > 0 and unablated.count() > 0
    assert page.locator("[data-condition=target] .tok").count() > 0
    assert page.locator("#ablation-live").get_attribute("data-status") == "done"
    assert page.locator(".history li.current .badge").inner_text() == "done"  # updated out of band
    shot(page, "ablation-live")
    assert ROOT.joinpath("test-artifacts", "ablation-live.png").exists()
