"""Feature labels at the paper's scale: the built-in labeler's rate, label search latency and the run page's category
analysis, on SQLite and (``--pg-url``) on Postgres.

1. Labeler: ``--label-features`` synthetic features in one layer, each with 20 top + 10 random examples of 71
   tokens (as the collector stores them; the tokens drawn from the seeded test vocabulary, so classes vary),
   labelled end to end by ``label_run`` (read, label, write, commit per slice). Prints labels/s and the time
   this rate gives for the paper's 229,376 features (an extrapolation: the work is per feature and per slice).
2. Search: 229,376 features with one built-in-style label each (``--search-features``) in one run, indexed by
   the FTS5 table through its triggers; then ``--queries`` label searches through the feature index's data
   layer (``feature_list(q=...)``, one page of 50) and through the bare match subquery; p50 / p99 / max.
3. The run page's category analysis over those 229,376 labels (``category_analysis``).

Parts 2 and 3 run on SQLite and, with ``--pg-url``, again on that Postgres database (migrated here; the runs
this creates there are deleted again): the two backends search differently (FTS5; a GIN tsvector index).

    python benchmarks/labels.py                              # the defaults below (about a minute on 2 cores)
    python benchmarks/labels.py --label-features 2048 --search-features 50000
    python benchmarks/labels.py --skip-labeler --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade  # noqa: E402
from app.db.schema import Run  # noqa: E402
from app.db.session import make_engine  # noqa: E402
from app.labels.analysis import category_analysis  # noqa: E402
from app.labels.run import label_run  # noqa: E402
from app.labels.store import label_match, label_sources  # noqa: E402
from app.web.data.features import FeatureQuery, feature_list  # noqa: E402
from tests.seed import VOCAB, write_tokenizer  # noqa: E402

PAPER_FEATURES = 229_376
N_TOP, N_RANDOM, WINDOW = 20, 10, 71
QUERIES = ["wait", "fires", "promotes hmm", "digits thinking", "answer", "newline prompt", "stated answer",
           "before wait", "mixed", "dead", "fires digits", "wait answer thinking", "zebra", "promotes wait",
           "formatting", "late thinking", "early", "check", "connectives", "the"]
LABEL_PARTS = (["fires on", "promotes", "fires just before", "mixed: fires on"],
               ["' Wait'", "' Hmm'", "digits", "'\\n\\n'", "' So'", "' the'", "'.'", "connectives", "' check'",
                "' Actually'", "'+'", "arithmetic tokens"],
               ["", "after a stated answer"],
               ["", "in thinking", "in the prompt", "in the answer", "early in thinking", "late in thinking"])
CATS = [("reasoning", "output"), ("reasoning", "input_simple"), ("domain", "math"), ("language", "formatting"),
        ("language", "connective"), ("uninterpretable", "mixed"), ("uninterpretable", "dead")]


def _run(engine, name: str, n_features: int, tok_dir: Path) -> int:
    with Session(engine) as s, s.begin():
        run = Run(name=name, base_model="b", target_model="t", config={"tokenizer": str(tok_dir)},
                  n_layers=max(1, n_features // 8192), n_features=min(n_features, 8192), status="collected")
        s.add(run)
        s.flush()
        return run.id


def _bulk(conn, sql: str, rows, batch: int = 5000) -> None:
    """executemany in batches; ``sql`` has qmark placeholders (SQLite's), rewritten for a format-style driver."""
    if conn.dialect.paramstyle in ("format", "pyformat"):
        sql = sql.replace("?", "%s")
    buf = []
    for r in rows:
        buf.append(r)
        if len(buf) >= batch:
            conn.exec_driver_sql(sql, buf)
            buf = []
    if buf:
        conn.exec_driver_sql(sql, buf)


def fill_examples(engine, rid: int, n: int, rng: random.Random) -> None:
    regions = json.dumps({"prompt": 5, "think-start": 0, "thinking": 40, "think-end": 0, "answer": 3})
    think = json.dumps({"edges": [k / 10 for k in range(11)], "counts": [3] * 10})
    pool = []
    for _ in range(2000):  # pre-serialised windows the rows draw from
        ids = [rng.randrange(6, len(VOCAB)) for _ in range(WINDOW)]
        acts = [0.0] * WINDOW
        acts[50] = round(rng.uniform(0.5, 5), 3)
        pool.append((json.dumps(ids), json.dumps(acts)))
    with engine.begin() as conn:
        _bulk(conn, 'INSERT INTO features (run_id, layer, "index", frequency, max_act, mean_act, logit_lens, '
                    "region_counts, think_pos_hist) VALUES (?,?,?,?,?,?,?,?,?)",
              ((rid, 0, i, 0.01, 3.0, 1.0,
                json.dumps({"top": [[t, None, 3 - 0.1 * k] for k, t in enumerate(rng.sample(range(6, len(VOCAB)), 10))],
                            "bottom": []}), regions, think) for i in range(n)))
        _bulk(conn, 'INSERT INTO examples (run_id, layer, "index", kind, rank, token_ids, acts, focus, max_act) '
                    "VALUES (?,?,?,?,?,?,?,?,?)",
              ((rid, 0, i, kind, r, *rng.choice(pool), 50, 3.0)
               for i in range(n) for kind, k in (("top", N_TOP), ("random", N_RANDOM)) for r in range(k)))


def fill_labels(engine, rid: int, n: int, rng: random.Random) -> float:
    t0 = time.perf_counter()
    with engine.begin() as conn:
        _bulk(conn, 'INSERT INTO features (run_id, layer, "index", frequency, max_act, mean_act, label, category) '
                    "VALUES (?,?,?,?,?,?,?,?)",
              ((rid, i // 8192, i % 8192, 0.01, 1.0, 0.5, None, None) for i in range(n)))
        rows = []
        for i in range(n):
            label = " ".join(p for p in (rng.choice(part) for part in LABEL_PARTS) if p)
            cat, sub = rng.choice(CATS)
            rows.append((rid, i // 8192, i % 8192, "builtin", label, cat, sub, 0.8))
        _bulk(conn, 'INSERT INTO feature_labels (run_id, layer, "index", source, label, category, subcategory, score) '
                    "VALUES (?,?,?,?,?,?,?,?)", rows)
        conn.exec_driver_sql('UPDATE features SET label = (SELECT label FROM feature_labels l WHERE l.run_id = '
                             'features.run_id AND l.layer = features.layer AND l."index" = features."index"), '
                             f"category = 'x' WHERE run_id = {rid}")
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def search_part(engine, backend: str, args: argparse.Namespace, tok: Path, data_dir: str, rng: random.Random) -> None:
    """Parts 2 and 3 on one backend: fill a run with a label per feature, search it, analyse its categories."""
    sid = _run(engine, f"search-{time.time_ns()}", args.search_features, tok)
    try:
        fill = fill_labels(engine, sid, args.search_features, rng)
        dialect = engine.dialect.name
        if dialect == "postgresql":
            with engine.begin() as conn:  # fresh statistics, as autovacuum would give a store this size
                conn.exec_driver_sql("ANALYZE features")
                conn.exec_driver_sql("ANALYZE feature_labels")
        print(f"[{backend}] search store: {args.search_features:,} features and labels written and indexed in "
              f"{fill:.1f} s")
        with Session(engine) as s:
            s.info["adapterlens_data_dir"] = data_dir
            page_ms, match_ms, hits, by_query = [], [], [], {}
            for k in range(args.queries):
                q = QUERIES[k % len(QUERIES)]
                t = time.perf_counter()
                page = feature_list(s, sid, FeatureQuery(q=q, limit=50))
                page_ms.append(1000 * (time.perf_counter() - t))
                by_query.setdefault(q, []).append(page_ms[-1])
                sub = label_match(dialect, sid, q)
                t = time.perf_counter()
                n = s.scalar(select(func.count()).select_from(sub))
                match_ms.append(1000 * (time.perf_counter() - t))
                hits.append(n)
                assert n == 0 or page.rows
            for name, ms in (("feature index page with ?q= (50 rows)", page_ms),
                             ("match subquery, counting every hit", match_ms)):
                print(f"[{backend}] label search, {name}: p50 {statistics.median(ms):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, "
                      f"max {max(ms):.1f} ms over {len(ms)} queries (hits per query: median "
                      f"{int(statistics.median(hits)):,}, max {max(hits):,})")
            slowest = sorted(by_query.items(), key=lambda kv: -statistics.median(kv[1]))[:3]
            print(f"[{backend}]   slowest queries (median ms of the page): "
                  + ", ".join(f"{q!r} {statistics.median(ms):.1f}" for q, ms in slowest))
            times = []
            for _ in range(5):
                t = time.perf_counter()
                cats = category_analysis(s, sid)
                times.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            label_sources(s, sid)
            src_ms = 1000 * (time.perf_counter() - t)
            print(f"[{backend}] run page category analysis over {cats.n_labelled:,} labels: median "
                  f"{statistics.median(times):.0f} ms of 5 (of which finding the labelers: {src_ms:.0f} ms)")
            if dialect == "sqlite":
                size = s.scalar(text("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"))
                print(f"[{backend}] database file: {size / 2**20:.0f} MiB")
    finally:
        with Session(engine) as s, s.begin():
            s.delete(s.get(Run, sid))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label-features", type=int, default=4096)
    ap.add_argument("--search-features", type=int, default=PAPER_FEATURES)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-labeler", action="store_true", help="only the search and category parts")
    ap.add_argument("--pg-url", default=None, help="also run the search and category parts on this Postgres database")
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'labels.db'}"
        upgrade(url)
        engine = make_engine(url)
        tok = Path(tmp) / "tok"
        write_tokenizer(tok)

        rid = _run(engine, "labeler", args.label_features, tok)
        t0 = time.perf_counter()
        fill_examples(engine, rid, 0 if args.skip_labeler else args.label_features, rng)
        fill_s = time.perf_counter() - t0
        out = label_run(engine, rid)
        rate = out["labelled"] / out["seconds"] if out["labelled"] else float("nan")
        print(f"built-in labeler: {out['labelled']} features ({N_TOP} top + {N_RANDOM} random examples of {WINDOW} "
              f"tokens each; filled in {fill_s:.1f} s) labelled in {out['seconds']:.2f} s = {rate:,.0f} labels/s; "
              f"at this rate the paper's {PAPER_FEATURES:,} features take {PAPER_FEATURES / rate:,.0f} s "
              f"(extrapolated)")
        search_part(engine, "sqlite", args, tok, tmp, rng)
        engine.dispose()
        if args.pg_url:
            upgrade(args.pg_url)
            pg = make_engine(args.pg_url)
            search_part(pg, "postgres", args, tok, tmp, random.Random(0))
            pg.dispose()


if __name__ == "__main__":
    main()
