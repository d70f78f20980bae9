"""The first hour, timed: ``adapterlens up`` on an empty data directory, as a new user starts it.

Starts ``adapterlens up`` (the embedded default: organism → train → collect → evaluate → hesitation study)
on a fresh data directory and polls the dashboard as a browser would, every ``--poll`` seconds:

- **first feature page**: ``/api/runs/1/features`` lists a feature and its page ``/runs/1/features/L/I``
  answers 200 with examples on it;
- **study**: ``/api/runs/1`` carries the hesitation study's card (its feature set chosen).

Printed: both times from the command's start against issue 17's targets (5 and 10 minutes), and each job's
own duration from the database. Nothing else should run on the machine meanwhile (two cores: a second busy
process halves the build's rate), so this is one run, ~14 minutes on a 2-core machine::

    python -m benchmarks.first_page                   # a temporary data directory, removed afterwards
    python -m benchmarks.first_page --data-dir /tmp/fp --keep
    python -m benchmarks.first_page --organism-preset organism-tiny --preset organism-tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

from tests.pg_cluster import free_port

TARGET_FIRST_PAGE_S = 300.0
TARGET_STUDY_S = 600.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def _first_feature_page(base: str) -> str | None:
    """The path of a feature page with examples, once there is one."""
    status, body = _get(f"{base}/api/runs/1/features?limit=1")
    if status != 200:
        return None
    rows = json.loads(body).get("rows") or []
    if not rows:
        return None
    path = f"/runs/1/features/{rows[0]['layer']}/{rows[0]['index']}"
    status, _html = _get(base + path)
    status_json, data = _get(f"{base}/api{path}")
    if status != 200 or status_json != 200:
        return None
    examples = json.loads(data).get("examples") or {}
    return path if any(examples.values()) else None


def _study_done(base: str) -> bool:
    status, body = _get(f"{base}/api/runs/1")
    if status != 200:
        return False
    return json.loads(body).get("study") is not None


def _job_durations(db: Path) -> list[tuple[str, float | None]]:
    """Each job's kind and own duration (None until it has finished), in queue order; [] before the store exists.

    Read-only: opening the path read-write would create the store's file before ``up`` does."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute("SELECT kind, started, finished FROM jobs ORDER BY id").fetchall()
    except sqlite3.Error:  # not created yet, or being migrated
        return []
    return [(kind, (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
             if started and finished else None) for kind, started, finished in rows]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="An empty directory (default: a temporary one).")
    ap.add_argument("--keep", action="store_true", help="Keep the data directory afterwards.")
    ap.add_argument("--poll", type=float, default=2.0, help="Seconds between the dashboard polls.")
    ap.add_argument("--timeout", type=float, default=3600.0, help="Give up after this many seconds.")
    ap.add_argument("--organism-preset", default="organism", help="`up --organism-preset` (organism-tiny: seconds).")
    ap.add_argument("--preset", default="organism", help="`up --preset`, the demo's training preset.")
    args = ap.parse_args(argv)

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="adapterlens-first-page-"))
    if data_dir.exists() and any(data_dir.iterdir()):
        sys.exit(f"{data_dir} is not empty: the benchmark times a first start")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # the embedded default: the data directory's SQLite store, whatever database this shell names
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ADAPTERLENS_DATABASE_URL")}
    env |= {"ADAPTERLENS_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    log = (data_dir.parent / f"{data_dir.name}-up.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port), "--no-progress",
                             "--organism-preset", args.organism_preset, "--preset", args.preset],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    first = study = None
    page = None
    db = data_dir / "adapterlens.db"
    try:
        while time.perf_counter() - t0 < args.timeout and (first is None or study is None):
            if proc.poll() is not None:
                sys.exit(f"adapterlens up exited with {proc.returncode}: see {log.name}")
            # every job ended (a study that chose no set leaves the run page without its card); read before the
            # polls, so that a page that came with the last job is still seen
            jobs = _job_durations(db)
            done = bool(jobs) and all(seconds is not None for _, seconds in jobs)
            now = time.perf_counter() - t0
            if first is None and (page := _first_feature_page(base)) is not None:
                first = now
                print(f"first feature page with examples after {first:.0f} s: {page}", flush=True)
            if study is None and _study_done(base):
                study = now
                print(f"hesitation study on the run page after {study:.0f} s", flush=True)
            if done:
                break
            time.sleep(args.poll)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    jobs = _job_durations(db)
    print("jobs (own durations, from the database):")
    for kind, seconds in jobs:
        print(f"  {kind:<11} {'unfinished' if seconds is None else f'{seconds:7.1f} s'}")
    for what, got, target in (("first feature page", first, TARGET_FIRST_PAGE_S),
                              ("whole demo study", study, TARGET_STUDY_S)):
        shown = "not reached" if got is None else f"{got:.0f} s = {got / 60:.1f} min"
        verdict = "" if got is None else (" (met)" if got <= target else " (not met)")
        print(f"{what}: {shown}; target {target / 60:.0f} min{verdict}")
    if not args.keep and args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
        Path(log.name).unlink(missing_ok=True)
    return {"first_page_s": first, "study_s": study, "page": page, "jobs": jobs}


if __name__ == "__main__":
    main()
