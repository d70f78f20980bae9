"""``benchmarks/labels.py`` at a toy scale, on SQLite and on a fresh Postgres database: the labeler labels, every
search lists features where its words match, and both stores print their figures (a Postgres path that broke
would leave the README's Postgres label-search row without a command that prints it). The figures themselves
are not a test (README, *Speed where users feel it*)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


def test_labels_benchmark_on_both_stores(pg_db_url: str) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/labels.py", "--label-features", "64", "--search-features",
                           "3000", "--queries", "20", "--pg-url", pg_db_url], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"built-in labeler: 64 features .* labelled", out), out
    for backend in ("sqlite", "postgres"):
        assert f"[{backend}] search store: 3,000 features" in out, out
        page = re.search(rf"\[{backend}\] label search, feature index page .* p99 ([\d.]+) ms", out)
        assert page and float(page.group(1)) > 0, out
        assert f"[{backend}] run page category analysis over 3,000 labels" in out, out
