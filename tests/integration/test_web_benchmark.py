"""``benchmarks/web.py`` at a toy scale on SQLite: it fills a store, starts the real server, and every endpoint
it times answers 200 (an endpoint that errors counts as an error, and a renamed route would make every figure
of the README's table a timing of error pages). The figures themselves are not a test (README, *Benchmarks*)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_web_benchmark_at_a_toy_scale(tmp_path):
    out = tmp_path / "web.json"
    proc = subprocess.run([sys.executable, "benchmarks/web.py", "--scale", "0.002", "--db", "sqlite", "--requests",
                           "8", "--concurrency", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    results = run["results"]["1"]
    assert len(results) == 10 and "feature page (HTML)" in results, list(results)
    for name, r in results.items():
        assert r["errors"] == 0 and r["req_per_s"] > 0, (name, r)
        assert r["server_cpu_ms"] > 0, (name, r)  # the server process's CPU is found in /proc
    assert "server CPU ms/req" in proc.stdout and "Postgres CPU ms/req" in proc.stdout
