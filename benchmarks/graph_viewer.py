"""The graph viewer at scale: serve and render a pruned 5,000-node graph in Chromium, then move the slider.

Builds a synthetic graph shaped like a pruned circuit-tracer graph of a long prompt (``--tokens`` positions,
``--layers`` layers, feature and error nodes up to ``--nodes`` in all, ~``--links-per-node`` incoming links
per feature, every feature with a row in ``features`` for its card), stores it in a fresh SQLite database,
starts the real server (``python -m app.web``) and opens the page in headless Chromium. Prints, from one run:

- serve: the view endpoint's time to first byte and its size, gzipped and not (measured from Python);
- render: navigation start → the graph drawn (``body[data-graph-ready]``), in the browser;
- slider: one pruning-slider move (input event → filters, layout, nodes, links, panels, URL, and the next
  two animation frames so the paint is included), median and worst of ``--moves`` moves; the target is
  < 200 ms, printed as a ratio;
- the same slider move on the seeded 30-node graph: the baseline from the same run (fixed costs).

    python benchmarks/graph_viewer.py                      # 5,000 nodes, 128 tokens, 8 layers
    python benchmarks/graph_viewer.py --nodes 10000 --links-per-node 20

Client, server and browser share this machine's cores; figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy.orm import Session  # noqa: E402

from app.db.migrate import upgrade  # noqa: E402
from app.db.schema import Feature, Graph, Prompt, Run  # noqa: E402
from app.db.session import make_engine  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
VOCAB = 2000
N_FEATURES = 8192  # features per layer (ids drawn from it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"model": {"type": "WordLevel", "vocab": {f"w{i}": i for i in range(VOCAB)}, "unk_token": "w0"},
            "added_tokens": []}
    (directory / "tokenizer.json").write_text(json.dumps(data))


def synthetic_graph(rng: random.Random, n_nodes: int, n_tokens: int, n_layers: int, links_per_node: int):
    """Nodes and links in circuit-tracer's format; cumulative influence by rank, as the attribute job writes it."""
    ids = [rng.randrange(VOCAB) for _ in range(n_tokens)]
    nodes = [{"node_id": f"E_{t}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
              "jsNodeId": f"E_{t}-{p}", "clerp": ""} for p, t in enumerate(ids)]
    logits = [rng.randrange(VOCAB) for _ in range(10)]
    n_err = min(n_layers * n_tokens // 3, (n_nodes - n_tokens - 10) // 10)
    n_feat = n_nodes - n_tokens - 10 - n_err
    inner = []
    seen = set()
    while len(inner) < n_feat:
        layer, idx, pos = rng.randrange(n_layers), rng.randrange(N_FEATURES), int(n_tokens * rng.random() ** 0.5)
        if (layer, idx, pos) in seen:
            continue
        seen.add((layer, idx, pos))
        inner.append(("f", layer, idx, pos))
    err_seen = set()
    while len(err_seen) < n_err:
        err_seen.add((rng.randrange(n_layers), rng.randrange(n_tokens)))
    inner += [("e", layer, -1, pos) for layer, pos in sorted(err_seen)]
    rng.shuffle(inner)
    total = len(inner)
    for rank, (kind, layer, idx, pos) in enumerate(inner):
        infl = 0.05 + 0.75 * (rank + 1) / total
        if kind == "f":
            nodes.append({"node_id": f"{layer}_{idx}_{pos}", "feature": (layer + idx) * (layer + idx + 1) // 2 + idx,
                          "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                          "jsNodeId": f"{layer}_{idx}-0", "clerp": "", "influence": infl,
                          "activation": round(rng.uniform(0.1, 8), 3)})
        else:
            nodes.append({"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                          "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{pos}", "clerp": "",
                          "influence": infl})
    for k, tok in enumerate(logits):
        nodes.append({"node_id": f"{n_layers + 1}_{tok}_{n_tokens - 1}", "feature": tok, "layer": str(n_layers + 1),
                      "ctx_idx": n_tokens - 1, "feature_type": "logit", "jsNodeId": f"L_{tok}-{n_tokens - 1}",
                      "clerp": f'Output "w{tok}" (p={0.5 / (k + 1):.3f})', "token_prob": 0.5 / (k + 1),
                      "is_target_logit": k == 0})
    by_layer: dict[int, list[dict]] = {}
    for n in nodes:
        if n["feature_type"] in ("cross layer transcoder", "mlp reconstruction error"):
            by_layer.setdefault(int(n["layer"]), []).append(n)
    embeds = nodes[:n_tokens]
    links = []
    for n in nodes:
        if n["feature_type"] != "cross layer transcoder":
            continue
        layer, pos = int(n["layer"]), n["ctx_idx"]
        pool = [m for lay in range(layer) for m in rng.sample(by_layer.get(lay, []), min(40, len(by_layer.get(lay, []))))
                if m["ctx_idx"] <= pos]
        sources = rng.sample(pool, min(len(pool), links_per_node - 2)) + [embeds[pos], embeds[rng.randrange(pos + 1)]]
        for src in sources:
            links.append({"source": src["node_id"], "target": n["node_id"], "weight": round(rng.gauss(0, 1), 4)})
        if layer >= n_layers - 2 or rng.random() < 0.1:
            links.append({"source": n["node_id"], "target": nodes[-10]["node_id"], "weight": round(rng.gauss(0, 1), 4)})
    return ids, nodes, links


def build_db(root: Path, args) -> tuple[str, int, int]:
    url = f"sqlite:///{root / 'bench.db'}"
    upgrade(url)
    write_tokenizer(root / "tokenizer")
    rng = random.Random(0)
    ids, nodes, links = synthetic_graph(rng, args.nodes, args.tokens, args.layers, args.links_per_node)
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        run = Run(name="bench", base_model="b", target_model="t", config={"tokenizer": str(root / "tokenizer")},
                  status="ready", n_layers=args.layers, n_features=N_FEATURES)
        s.add(run)
        s.flush()
        prompt = Prompt(run_id=run.id, source="graph", text="bench", token_ids=ids)
        s.add(prompt)
        s.flush()
        keys = {(int(n["layer"]), int(n["node_id"].split("_")[1])) for n in nodes
                if n["feature_type"] == "cross layer transcoder"}
        s.add_all([Feature(run_id=run.id, layer=layer, index=idx, frequency=rng.random() ** 3, max_act=5.0,
                           logit_lens={"top": [[rng.randrange(VOCAB), None, 2.0] for _ in range(6)],
                                       "bottom": [[rng.randrange(VOCAB), None, -2.0] for _ in range(6)]})
                   for layer, idx in keys])
        g = Graph(run_id=run.id, slug="bench", prompt_id=prompt.id, prompt="bench", target_token_id=None,
                  position=len(ids) - 1, params={"mode": "frozen-mlp", "node_threshold": 0.8, "edge_threshold": 0.98},
                  nodes=nodes, links=links, scores={"n_nodes": len(nodes), "n_links": len(links)})
        s.add(g)
        s.flush()
        run_id, graph_id = run.id, g.id
    engine.dispose()
    print(f"graph: {len(nodes):,} nodes ({len(keys):,} distinct features), {len(links):,} links, "
          f"{args.tokens} tokens, {args.layers} layers")
    return url, run_id, graph_id


def start_server(url: str, root: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.web", "--port", str(port)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "DATABASE_URL": url,
                                                           "ADAPTERLENS_DATA_DIR": str(root),
                                                           "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/api/", timeout=2):
                return base, proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit((root / "server.log").read_text())


def fetch(url: str, gz: bool) -> tuple[float, float, int]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gz else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as resp:
        first = resp.read(1)
        t_first = time.perf_counter() - t0
        body = first + resp.read()
    return t_first, time.perf_counter() - t0, len(body)


SLIDE = """async (v) => {
  const el = document.querySelector('[data-pruning]');
  const t0 = performance.now();
  el.value = v; el.dispatchEvent(new Event('input', {bubbles: true}));
  const handler = performance.now() - t0;
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return {total: performance.now() - t0, handler, render: Number(document.querySelector('[data-graph-pane]').dataset.renderMs),
          nodes: Number(document.querySelector('[data-live-counts]').dataset.nodes),
          links: Number(document.querySelector('[data-live-counts]').dataset.links)};
}"""


def slider_moves(page, moves: int) -> list[dict]:
    values = [round(0.8 - 0.7 * k / max(moves - 1, 1), 2) for k in range(moves)]
    return [page.evaluate(SLIDE, str(v)) for v in values]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--links-per-node", type=int, default=14)
    ap.add_argument("--moves", type=int, default=9)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="graph-viewer-bench-"))
    url, run_id, graph_id = build_db(root, args)
    from tests.seed import seed_world  # the 30-node baseline graph, same server

    engine = make_engine(url)
    world = seed_world(engine, root / "seed-tokenizer")
    engine.dispose()
    base, proc = start_server(url, root)
    try:
        view = f"{base}/api/runs/{run_id}/graphs/{graph_id}/view"
        fetch(view, True)  # warm the server (imports, tokenizer)
        ttfb_raw, t_raw, size_raw = fetch(view, False)
        ttfb_gz, t_gz, size_gz = fetch(view, True)
        print(f"serve  view JSON: {size_raw / 2**20:.1f} MB in {1000 * t_raw:.0f} ms (first byte {1000 * ttfb_raw:.0f} ms);"
              f" gzipped {size_gz / 2**20:.2f} MB in {1000 * t_gz:.0f} ms (first byte {1000 * ttfb_gz:.0f} ms)")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            results = {}
            for name, path in (("5k", f"/runs/{run_id}/graphs/{graph_id}"),
                               ("seed", f"/runs/{world.run_id}/graphs/{world.graph_id}")):
                page.goto(base + path)
                page.wait_for_selector("body[data-graph-ready=true]", timeout=120_000)
                ready = page.evaluate("performance.now()")
                first_render = float(page.get_attribute("[data-graph-pane]", "data-render-ms"))
                counts = page.inner_text("[data-live-counts]")
                moves = slider_moves(page, args.moves)
                results[name] = (ready, first_render, counts, moves)
            browser.close()
        for name, (ready, first_render, counts, moves) in results.items():
            totals = [m["total"] for m in moves]
            renders = [m["render"] for m in moves]
            label = f"{args.nodes:,}-node graph" if name == "5k" else "seeded 30-node graph (baseline)"
            print(f"render {label}: navigation → drawn {ready:.0f} ms (first draw {first_render:.0f} ms); {counts}")
            print(f"slider {label}: median {statistics.median(totals):.0f} ms, worst {max(totals):.0f} ms per move "
                  f"(redraw alone median {statistics.median(renders):.0f} ms; {moves[-1]['nodes']:,}–"
                  f"{moves[0]['nodes']:,} nodes shown)")
        med = statistics.median(m["total"] for m in results["5k"][3])
        base_med = statistics.median(m["total"] for m in results["seed"][3])
        print(f"target: a slider move < 200 ms → {med:.0f} ms = {med / 200:.2f}× the target, "
              f"{med / max(base_med, 1e-3):.1f}× the 30-node baseline ({base_med:.0f} ms)")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
