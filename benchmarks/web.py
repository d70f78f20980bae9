"""Dashboard latency under concurrent load, at the paper's scale, on SQLite and Postgres.

Fills a fresh database with synthetic rows shaped like a real collection (28 layers × 8192 features,
20 top + 10 random examples of 71 tokens each = 229,376 features and 6.9M examples at ``--scale 1``),
starts the real server (``python -m app.web``) on it, and requests feature pages and the feature
index from ``--concurrency`` client threads. Prints p50 / p99 / max per endpoint, and the server process's
CPU time per request (from /proc: on a machine other programs load, latencies mostly measure queueing
while the CPU per request still measures the server's own work), and that of a local Postgres's processes.

    python benchmarks/web.py --scale 0.02 --db sqlite           # quick (~4.6k features, ~140k examples)
    python benchmarks/web.py --scale 1 --db both                # the paper's scale (~8 GB per backend)
    python benchmarks/web.py --scale 1 --db sqlite --server-workers 1 2 --concurrency 8   # 1 vs 2 processes

Postgres: ``--pg-url`` names a server whose user may create databases (default: the local one); a
throwaway database is created and dropped. Client and server share this machine's cores, so numbers
are end-to-end latencies including queueing, not server CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade  # noqa: E402
from app.db.schema import FeatureSet, Run  # noqa: E402
from app.db.session import make_engine  # noqa: E402

PAPER_LAYERS, PAPER_FEATURES = 28, 8192  # 229,376 features
N_TOP, N_RANDOM = 20, 10  # examples per feature, as the collector keeps them
CTX_BEFORE, CTX_AFTER = 50, 20  # tokens around the focus
VOCAB = 5000  # synthetic vocabulary size (token ids in examples and the logit lens)
EXAMPLE_POOL, FEATURE_POOL = 4000, 500  # distinct pre-serialized payloads the rows draw from


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json with ``VOCAB`` pieces, so pages decode tokens as in a real run."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    data = {"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}, "added_tokens": []}
    (directory / "tokenizer.json").write_text(json.dumps(data))


def _payload_pools(rng: random.Random, n_feat: int, n_layers: int) -> tuple[list, list]:
    """Pre-serialized JSON for examples and features, reused across rows (the content is synthetic;
    what matters for latency is row count and size, and drawing 10⁹ random numbers would dominate)."""
    length = CTX_BEFORE + 1 + CTX_AFTER
    examples = []
    for _ in range(EXAMPLE_POOL):
        max_act = rng.uniform(1, 30)
        acts = [0.0] * length
        for _ in range(6):
            acts[rng.randrange(length)] = round(rng.uniform(0, max_act), 3)
        acts[CTX_BEFORE] = round(max_act, 3)
        examples.append((json.dumps([rng.randrange(VOCAB) for _ in range(length)]), json.dumps(acts), max(acts)))
    features = []
    for _ in range(FEATURE_POOL):
        lens = {k: [[rng.randrange(VOCAB), f"w{rng.randrange(VOCAB)}", round(rng.uniform(-5, 5), 3)] for _ in range(10)]
                for k in ("top", "bottom")}
        features.append(tuple(json.dumps(x) for x in (
            {"edges": [0.01 * 1.6 ** k for k in range(21)], "counts": [rng.randrange(1000) for _ in range(20)]},
            lens,
            {"prompt": rng.randrange(100), "thinking": rng.randrange(1000)},
            {"edges": [k / 20 for k in range(21)], "counts": [rng.randrange(50) for _ in range(20)]},
            [[rng.randrange(n_layers), rng.randrange(n_feat), round(rng.random(), 3)] for _ in range(10)],
        )))
    return examples, features


def fill(url: str, scale: float, tok_dir: Path, seed: int = 0) -> tuple[int, int, int]:
    """Create the schema and the synthetic run (bulk-loaded through the driver); returns (run, layers, features)."""
    rng = random.Random(seed)
    upgrade(url)
    n_layers = PAPER_LAYERS
    n_feat = max(1, round(PAPER_FEATURES * scale))
    engine = make_engine(url)
    with engine.begin() as conn:
        run_id = conn.execute(insert(Run).values(
            name=f"bench-{uuid.uuid4().hex[:6]}", base_model="Qwen/Qwen2.5-Math-7B",
            target_model="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", config={"tokenizer": str(tok_dir)},
            status="ready", n_layers=n_layers, n_features=n_feat, d_model=3584).returning(Run.id)).scalar_one()
        set_id = conn.execute(insert(FeatureSet).values(run_id=run_id, name="hesitation").returning(FeatureSet.id)).scalar_one()
    ex_pool, feat_pool = _payload_pools(rng, n_feat, n_layers)
    ex_focus = [json.loads(ids)[CTX_BEFORE] for ids, _, _ in ex_pool]
    promotes_pool = []  # per feature payload: distinct lens-top token ids with their rank and value
    for _, lens, *_ in feat_pool:
        seen: dict[int, tuple[int, float]] = {}
        for rank, (tid, _, value) in enumerate(json.loads(lens)["top"]):
            seen.setdefault(tid, (rank, value))
        promotes_pool.append([(tid, rank, value) for tid, (rank, value) in seen.items()])
    categories = ["reasoning", "language", "domain", "uninterpretable", None]
    pg = engine.dialect.name == "postgresql"
    feat_cols = ("run_id", "layer", "index", "frequency", "max_act", "mean_act", "category", "label", "histogram",
                 "logit_lens", "region_counts", "think_pos_hist", "neighbours")
    ex_cols = ("run_id", "layer", "index", "kind", "rank", "token_ids", "acts", "focus", "max_act")
    tok_cols = ("run_id", "relation", "token_id", "layer", "index", "rank", "value")
    member_rows = []
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for layer in tqdm(range(n_layers), desc="layers", unit="layer"):
            feats, exs, toks = [], [], []
            for index in range(n_feat):
                max_act = rng.uniform(1, 30)
                k = rng.randrange(FEATURE_POOL)
                hist, lens, regions, think, nbrs = feat_pool[k]
                feats.append((run_id, layer, index, rng.random() ** 4 * 0.1, max_act, max_act / 4,
                              rng.choice(categories), None, hist, lens, regions, think, nbrs))
                # the token search table, as collect fills it: lens top 10 (promotes), top examples' focus (fires_on)
                toks += [(run_id, "promotes", tid, layer, index, rank, value)
                         for tid, rank, value in promotes_pool[k]]
                fires: dict[int, tuple[int, float]] = {}
                for kind, n in (("top", N_TOP), ("random", N_RANDOM)):
                    for rank in range(n):
                        e = rng.randrange(EXAMPLE_POOL)
                        ids, acts, mx = ex_pool[e]
                        exs.append((run_id, layer, index, kind, rank, ids, acts, CTX_BEFORE, mx))
                        if kind == "top" and ex_focus[e] not in fires:
                            fires[ex_focus[e]] = (rank, mx)
                toks += [(run_id, "fires_on", tid, layer, index, rank, value) for tid, (rank, value) in fires.items()]
                if rng.random() < 0.024:  # ~2.4% of features form the hesitation set (the paper's share)
                    member_rows.append((set_id, layer, index, rng.choice(["output", "template"]), rng.random()))
            for table, cols, rows in (("features", feat_cols, feats), ("examples", ex_cols, exs),
                                      ("feature_tokens", tok_cols, toks)):
                names = ", ".join(f'"{c}"' for c in cols)
                if pg:
                    with cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                else:
                    cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(cols))})", rows)
            raw.commit()
        placeholder = "%s" if pg else "?"
        cur.executemany(f'INSERT INTO feature_set_members (set_id, layer, "index", role, score) VALUES '
                        f"({', '.join([placeholder] * 5)})", member_rows)
        raw.commit()
    finally:
        raw.close()
    if pg:  # VACUUM too, as autovacuum would have by the time someone browses: a store in steady state, not
        # one whose freshly loaded tables autovacuum (an insert threshold since Postgres 13) works on mid-measurement
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    engine.dispose()
    return run_id, n_layers, n_feat


def start_server(url: str, data_dir: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "ADAPTERLENS_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "app.web", "--port", str(port), "--workers", str(workers)],
                            cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            with urllib.request.urlopen(base + "/api/", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the server exited at start") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def fetch(url: str) -> float:
    """Seconds until the whole response arrived; ``inf`` for an error or a timeout (counted, not raised)."""
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            resp.read()
            if resp.status != 200:
                return float("inf")
    except OSError:
        return float("inf")
    return time.perf_counter() - start


def cpu_seconds(server_pid: int | None) -> tuple[float, float]:
    """User + system CPU seconds so far, from one pass over Linux /proc (0 elsewhere): of the server (process
    ``server_pid`` and its children: with ``--server-workers`` > 1 uvicorn's supervisor and its server processes),
    and of this machine's Postgres processes (0 for SQLite or a server on another machine), each live one's own
    plus its reaped children's, so a backend that exits (the pool closes connections beyond its size) moves its
    time into the postmaster's count, not out of the sum."""
    tick = os.sysconf("SC_CLK_TCK")
    server = postgres = 0.0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            head, tail = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = tail.split()  # fields[1]: parent pid; [11:13] utime stime; [13:15] cutime cstime
        if server_pid is not None and server_pid in (int(entry), int(fields[1])):
            server += (int(fields[11]) + int(fields[12])) / tick
        if head.endswith("(postgres"):
            postgres += sum(int(f) for f in fields[11:15]) / tick
    return server, postgres


def load(base: str, run_id: int, n_layers: int, n_feat: int, requests: int, concurrency: int, seed: int = 1,
         server_pid: int | None = None) -> dict:
    rng = random.Random(seed)
    endpoints = {
        "feature page (HTML)": lambda: f"/runs/{run_id}/features/{rng.randrange(n_layers)}/{rng.randrange(n_feat)}",
        "feature (JSON)": lambda: f"/api/runs/{run_id}/features/{rng.randrange(n_layers)}/{rng.randrange(n_feat)}",
        "index: first page": lambda: f"/runs/{run_id}/features",
        "index: keyset page": lambda: f"/runs/{run_id}/features?after={rng.randrange(n_layers)}:{rng.randrange(n_feat)}",
        "index: layer by frequency": lambda: f"/runs/{run_id}/features?layer={rng.randrange(n_layers)}&sort=frequency",
        "index: by max act, next page": lambda: f"/runs/{run_id}/features?sort=max_act&after={rng.uniform(1, 30)!r}:0:0",
        "index: hesitation set": lambda: f"/runs/{run_id}/features?in_set=true",
        "run overview": lambda: f"/runs/{run_id}",
        "index: promotes token": lambda: f"/runs/{run_id}/features?promotes=w{rng.randrange(VOCAB)}",
        "index: fires on token": lambda: f"/runs/{run_id}/features?fires_on=w{rng.randrange(VOCAB)}",
    }
    slow: set[str] = set()  # endpoints given fewer requests
    results = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for name, make in endpoints.items():
            urls = [base + make() for _ in range(max(concurrency, requests // 10) if name in slow else requests)]
            list(pool.map(fetch, urls[: concurrency * 2]))  # warm-up (connections, caches)
            c0, d0 = cpu_seconds(server_pid)  # read outside the timed window
            t0 = time.perf_counter()
            times = sorted(pool.map(fetch, urls))
            wall = time.perf_counter() - t0
            c1, d1 = cpu_seconds(server_pid)
            cpu = c1 - c0 if server_pid else float("nan")
            db_cpu = d1 - d0
            errors = sum(t == float("inf") for t in times)
            times = [t for t in times if t != float("inf")] or [float("nan")]
            results[name] = {
                "errors": errors, "n": len(urls),
                "p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
                "max_ms": 1000 * times[-1], "req_per_s": len(times) / wall,
                "server_cpu_ms": 1000 * cpu / len(urls),  # the server's CPU per request: load from others adds little
                "db_cpu_ms": 1000 * db_cpu / len(urls),  # local Postgres processes' CPU per request (0 on SQLite)
            }
    return results


def run_backend(kind: str, args: argparse.Namespace, work: Path) -> dict:
    tok_dir = work / "tokenizer"
    write_tokenizer(tok_dir)
    admin = None
    if kind == "sqlite":
        url = f"sqlite:///{work / 'bench.db'}"
    else:
        name = f"adapterlens_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = args.pg_url.rsplit("/", 1)[0] + "/" + name
    try:
        t0 = time.perf_counter()
        run_id, n_layers, n_feat = fill(url, args.scale, tok_dir)
        fill_s = time.perf_counter() - t0
        by_workers = {}
        for workers in args.server_workers:  # the same filled store for each server size
            proc, base = start_server(url, work, workers)
            try:
                by_workers[workers] = load(base, run_id, n_layers, n_feat, args.requests, args.concurrency,
                                           server_pid=proc.pid)
            finally:
                proc.terminate()
                proc.wait(10)
        return {"backend": kind, "features": n_layers * n_feat, "examples": n_layers * n_feat * (N_TOP + N_RANDOM),
                "fill_s": fill_s, "results": by_workers}
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.02, help="fraction of the paper's 8192 features per layer")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--server-workers", type=int, nargs="+", default=[1],
                        help="server processes (`adapterlens serve --workers`), one load run per value on the same "
                             "store; one process serves about one core's worth of pages")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    backends = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    out = []
    for kind in backends:
        with tempfile.TemporaryDirectory(prefix="adapterlens-bench-") as tmp:
            res = run_backend(kind, args, Path(tmp))
        out.append(res)
        for workers, results in res["results"].items():
            print(f"\n{kind}: {res['features']:,} features, {res['examples']:,} examples (filled in "
                  f"{res['fill_s']:.0f}s); {args.concurrency} client threads, {workers} server process(es), "
                  f"{args.requests} requests per endpoint")
            print(f"{'endpoint':32} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>7} {'errors':>7} "
                  f"{'server CPU ms/req':>18} {'Postgres CPU ms/req':>20}")
            for name, r in results.items():
                print(f"{name:32} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['max_ms']:8.1f} {r['req_per_s']:7.1f} "
                      f"{r['errors']:>3}/{r['n']} {r['server_cpu_ms']:18.1f} {r['db_cpu_ms']:20.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": out}, indent=2))


if __name__ == "__main__":
    main()
