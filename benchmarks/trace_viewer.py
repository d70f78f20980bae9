"""The trace viewer at scale: serve and render a 10,000-token stored trace in Chromium, against a 100-token one.

Stores, in a fresh SQLite database, a run with a synthetic word-level tokenizer, two traces (``--tokens``
and ``--baseline`` tokens, hesitation tokens sprinkled in) and, for each, a finished lens of the same ids
shaped like the diff lens' result (per-token KLs, ``--features-per-token`` strongest features per position,
and one watched feature's activation at every token). Starts the real server (``python -m app.web``) and
prints, from one run, for both traces:

- serve: the page's HTML (shaded by one feature, ``?feature=1/3``) — median time and size over ``--repeat``;
- render: navigation start → load event → the next two animation frames (the strip and minimap painted),
  in headless Chromium;
- jump: one "next firing" click and one minimap click (handler + two frames, so the scroll and paint count).

    python benchmarks/trace_viewer.py                      # 10,000 tokens vs 100

Client, server and browser share this machine's cores; figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from graph_viewer import CHROMIUM, CHROMIUM_ARGS, start_server  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from app.db.lens_request import token_key  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.schema import LensResult, Prompt, Run  # noqa: E402
from app.db.session import make_engine  # noqa: E402

VOCAB = 2000
HESITATION = VOCAB  # the id of "Wait"
NEWLINE = VOCAB + 1  # "\n\n": a reasoning trace's paragraphs
FEATURE = (1, 3)


def write_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(VOCAB)} | {"Wait": HESITATION, "\n\n": NEWLINE}
    data = {"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}, "added_tokens": []}
    (directory / "tokenizer.json").write_text(json.dumps(data))


def synthetic_trace(rng: random.Random, n: int, per_token: int) -> tuple[list[int], dict]:
    ids = [HESITATION if r < 0.01 else NEWLINE if r < 0.02 else rng.randrange(VOCAB)
           for r in (rng.random() for _ in range(n))]
    watched = [round(rng.uniform(0.5, 4), 3) if rng.random() < 0.05 else 0.0 for _ in range(n)]
    features = []
    for _ in range(n):
        keys = [(rng.randrange(8), rng.randrange(4096)) for _ in range(per_token)]
        features.append([[k[0] for k in keys], [k[1] for k in keys],
                         [round(rng.uniform(0.1, 5), 3) for _ in keys], [round(rng.gauss(0, 1), 3) for _ in keys]])
    result = {"kl_hybrid": [round(rng.expovariate(5), 4) for _ in range(n)],
              "kl_adapted": [round(rng.expovariate(5), 4) for _ in range(n)],
              "features": features, "watched": {f"{FEATURE[0]}/{FEATURE[1]}": watched}}
    return ids, result


def build_db(root: Path, sizes: list[int], per_token: int) -> tuple[str, int, list[int]]:
    url = f"sqlite:///{root / 'bench.db'}"
    upgrade(url)
    write_tokenizer(root / "tokenizer")
    rng = random.Random(0)
    engine = make_engine(url)
    trace_ids = []
    with Session(engine) as s, s.begin():
        run = Run(name="bench", base_model="b", target_model="t", config={"tokenizer": str(root / "tokenizer")},
                  status="ready", n_layers=8, n_features=4096)
        s.add(run)
        s.flush()
        for n in sizes:
            ids, result = synthetic_trace(rng, n, per_token)
            prompt = Prompt(run_id=run.id, source="trace", text=f"bench {n}", token_ids=ids,
                            regions=[[0, 50, "prompt"], [50, n, "thinking"]])
            s.add(prompt)
            s.flush()
            s.add(LensResult(run_id=run.id, status="done", request={"token_ids": ids}, request_key=f"bench-{n}",
                             token_key=token_key(ids), n_tokens=n, result=result))
            trace_ids.append(prompt.id)
        run_id = run.id
    engine.dispose()
    return url, run_id, trace_ids


def fetch(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        body = resp.read()
    return time.perf_counter() - t0, len(body)


RENDERED = """async () => {
  if (document.readyState !== 'complete') await new Promise((r) => addEventListener('load', r, {once: true}));
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const nav = performance.getEntriesByType('navigation')[0];
  return {painted: performance.now(), load: nav.loadEventEnd, dom: nav.domContentLoadedEventEnd,
          tokens: document.querySelectorAll('[data-trace] .tok').length,
          firing: document.querySelectorAll('[data-trace] .tok.fires').length};
}"""
CLICK = """async (arg) => {
  const el = document.querySelector(arg.sel);
  const t0 = performance.now();
  if (arg.pos === undefined) el.click();
  else {  // the minimap canvas: a click on the cell of token arg.pos
    const r = el.getBoundingClientRect(), cols = Number(el.dataset.cols), h = Number(el.dataset.cellH);
    el.dispatchEvent(new MouseEvent('click', {bubbles: true, clientX: r.left + (arg.pos % cols) * 6 + 2,
                                              clientY: r.top + Math.floor(arg.pos / cols) * h + h / 2}));
  }
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const f = document.querySelector('[data-trace] .tok.focus');
  return {ms: performance.now() - t0, pos: f ? Number(f.dataset.pos) : null, scroll: scrollY};
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--baseline", type=int, default=100)
    ap.add_argument("--features-per-token", type=int, default=32)  # the lens keeps up to 32
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--query", default=f"feature={FEATURE[0]}/{FEATURE[1]}",
                    help="the page's query: feature=1/3 (default), shade=kl-hybrid, shade=none")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="trace-viewer-bench-"))
    sizes = [args.tokens, args.baseline]
    url, run_id, trace_ids = build_db(root, sizes, args.features_per_token)
    base, proc = start_server(url, root)
    try:
        paths = {n: f"/runs/{run_id}/traces/{tid}?{args.query}" for n, tid in zip(sizes, trace_ids, strict=True)}
        fetch(base + paths[args.baseline])  # warm the server (imports, tokenizer)
        served = {}
        for n, path in paths.items():
            runs = [fetch(base + path) for _ in range(args.repeat)]
            served[n] = (statistics.median(t for t, _ in runs), runs[0][1])
        rendered = {}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for n, path in paths.items():
                times, jumps = [], []
                for _ in range(max(1, args.repeat // 2)):
                    page = browser.new_page(viewport={"width": 1400, "height": 900})
                    page.goto(base + path, wait_until="commit")
                    r = page.evaluate(RENDERED)
                    times.append(r)
                    nxt = page.evaluate(CLICK, {"sel": "[data-next-firing]"}) if r["firing"] else {"ms": 0}
                    mm = page.evaluate(CLICK, {"sel": "[data-minimap-canvas]", "pos": n * 3 // 4})
                    jumps.append((nxt, mm))
                    page.close()
                rendered[n] = (times, jumps)
            browser.close()
        for n in sizes:
            t, size = served[n]
            times, jumps = rendered[n]
            label = f"{n:,}-token trace" + (" (baseline)" if n == args.baseline else "")
            print(f"serve  {label}: {1000 * t:.0f} ms median of {args.repeat}, {size / 2**20:.2f} MB HTML")
            print(f"render {label}: navigation → painted {statistics.median(r['painted'] for r in times):.0f} ms "
                  f"(DOM ready {statistics.median(r['dom'] for r in times):.0f} ms, load "
                  f"{statistics.median(r['load'] for r in times):.0f} ms); {times[0]['tokens']:,} tokens, "
                  f"{times[0]['firing']:,} firing")
            print(f"jump   {label}: next firing {statistics.median(j[0]['ms'] for j in jumps):.0f} ms, minimap "
                  f"{statistics.median(j[1]['ms'] for j in jumps):.0f} ms (to token {jumps[0][1]['pos']})")
        big, small = rendered[args.tokens][0], rendered[args.baseline][0]
        ratio = statistics.median(r["painted"] for r in big) / max(statistics.median(r["painted"] for r in small), 1e-3)
        print(f"render {args.tokens:,} vs {args.baseline:,} tokens: {ratio:.1f}× the baseline's time")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
