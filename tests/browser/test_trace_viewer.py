"""The trace viewer in Chromium over the tiny trained organism run, with a real lens worker: a long stored trace,
a jump by the minimap (the focused token and the scroll position change), the diff lens run from the page, then
one feature's shading with "next firing" / "previous firing"."""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import LensResult, Prompt, Run
from app.db.session import make_engine
from tests.browser.conftest import _stop, shot, start_process, start_server

pytestmark = pytest.mark.browser

WORKER_CODE = (
    "import logging; logging.basicConfig(level=logging.INFO)\n"
    "from app.settings import Settings\nfrom worker.loop import run_worker\n"
    "run_worker(Settings(), kinds=['lens'], handler_modules=['worker.lens.job'], idle_wait_s=0.2)\n"
)
TEXT = "86 + 87 = 173. Wait, let me check the carry again: 6 + 7 = 13, so 1 carry.\n\n" * 13  # about 480 tokens (the tiny model's context is 512)


@pytest.fixture
def live(tiny_run_settings, tmp_path):
    """The server and one lens worker over a copy of the tiny run's store holding one long trace."""
    from worker.ablation.job import encode
    from worker.models_cache import tokenizer_for

    db = tmp_path / "adapterlens.db"
    shutil.copy(tiny_run_settings.data_dir / "adapterlens.db", db)
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        run = s.scalars(select(Run).order_by(Run.id).limit(1)).one()
        ids = encode(tokenizer_for(run.target_model, tiny_run_settings), TEXT)
        trace = Prompt(run_id=run.id, source="trace", text=TEXT, token_ids=ids,
                       regions=[[0, 10, "prompt"], [10, len(ids), "thinking"]])
        s.add(trace)
        s.flush()
        run_id, trace_id = run.id, trace.id
    env = {"DATABASE_URL": url, "ADAPTERLENS_DATA_DIR": str(tiny_run_settings.data_dir), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    worker = start_process(["-c", WORKER_CODE], env, tmp_path / "worker.log")
    server = start_server(url, tiny_run_settings.data_dir, tmp_path / "server.log")
    try:
        yield server, engine, run_id, trace_id, len(ids), tmp_path / "worker.log"
    finally:
        _stop(server.process)
        _stop(worker)
        engine.dispose()


FOCUSED = "() => { const e = document.querySelector('[data-trace] .tok.focus'); return e ? Number(e.dataset.pos) : null; }"
ACTIVE = "() => document.activeElement && document.activeElement.dataset.pos !== undefined ? Number(document.activeElement.dataset.pos) : null"


def click_minimap(page, pos: int) -> None:
    """Click the minimap canvas on the cell of token ``pos`` (its layout is on the canvas' data attributes)."""
    canvas = page.locator("[data-minimap-canvas]")
    cols, cell_h = int(canvas.get_attribute("data-cols")), float(canvas.get_attribute("data-cell-h"))
    canvas.click(position={"x": (pos % cols) * 6 + 2, "y": (pos // cols) * cell_h + cell_h / 2})


def test_minimap_jump_and_next_firing_on_a_long_trace(live, page):
    server, engine, run_id, trace_id, n, worker_log = live
    assert 400 < n <= 512
    page.set_viewport_size({"width": 640, "height": 480})  # the strip is several screens long
    page.goto(f"{server.url}/runs/{run_id}/traces/{trace_id}")
    assert page.locator("[data-trace] .tok").count() == n
    assert page.locator("[data-trace] .trace-chunk").count() >= 2  # blocks laid out near the viewport only
    assert page.evaluate("JSON.parse(document.querySelector('[data-minimap-data]').textContent).n") == n
    assert page.locator("[data-minimap-canvas]").bounding_box()["height"] <= 480  # the whole trace, no scrolling
    assert page.evaluate(FOCUSED) is None and page.evaluate("window.scrollY") == 0
    target = n - 20
    click_minimap(page, target)
    assert page.evaluate(FOCUSED) == target and page.evaluate(ACTIVE) == target
    assert page.url.endswith(f"#t{target}")
    assert page.evaluate("window.scrollY") > 0  # the strip scrolled to it
    box = page.locator(f"#t{target}").bounding_box()
    assert 0 <= box["y"] <= 480  # in the viewport
    click_minimap(page, 3)
    assert page.evaluate(FOCUSED) == 3 and page.evaluate("window.scrollY") < 200

    # the diff lens, run from the page (a real worker), then shade by a feature it found
    page.click("[data-trace-lens] button[type=submit]")
    page.wait_for_url(f"**/runs/{run_id}/traces/{trace_id}#t3")  # back on the token in focus before
    assert page.evaluate(FOCUSED) == 3
    deadline = time.monotonic() + 180
    while page.locator("[data-shade]").count() == 0:
        with Session(engine) as s:
            failed = s.scalar(select(LensResult.id).where(LensResult.status == "failed"))
        if failed or time.monotonic() > deadline:
            pytest.fail(f"the lens did not finish; worker log:\n{worker_log.read_text()[-3000:]}")
        time.sleep(1)
        page.reload()
    with Session(engine) as s:
        result = s.scalars(select(LensResult.result).where(LensResult.status == "done")).one()
    counts = Counter((ln, ix) for cols in result["features"] for ln, ix in zip(cols[0], cols[1], strict=True))
    sparse = [key for key, c in counts.most_common() if 3 <= c <= n // 2]  # fires here and there, not everywhere
    assert sparse, counts.most_common(5)
    layer, index = sparse[0]
    page.goto(f"{server.url}/runs/{run_id}/traces/{trace_id}?feature={layer}/{index}")
    firing = page.evaluate("[...document.querySelectorAll('[data-trace] .tok.fires')].map(e => Number(e.dataset.pos))")
    assert 3 <= len(firing) <= n // 2
    assert page.evaluate("JSON.parse(document.querySelector('[data-minimap-data]').textContent).fires") == firing
    assert page.locator("[data-n-firing]").inner_text() == str(len(firing))
    page.click("[data-next-firing]")
    assert page.evaluate(FOCUSED) == firing[0]
    page.click("[data-next-firing]")
    assert page.evaluate(FOCUSED) == firing[1] and page.url.endswith(f"#t{firing[1]}")
    assert "firing 2 of" in page.locator("[data-firing-at]").inner_text()
    page.click("[data-prev-firing]")
    assert page.evaluate(FOCUSED) == firing[0]
    page.click("[data-prev-firing]")  # wraps to the last
    assert page.evaluate(FOCUSED) == firing[-1]
    # a jump by the minimap, then "next firing" goes on from there
    middle = n // 2
    click_minimap(page, middle)
    page.click("[data-next-firing]")
    after = [p for p in firing if p > middle]
    assert page.evaluate(FOCUSED) == (after[0] if after else firing[0])
    shot(page, "trace-viewer")
