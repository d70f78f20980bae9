"""``benchmarks/first_page.py`` on the tiny organism: it starts ``adapterlens up`` on an empty data directory,
sees a feature page with examples through the dashboard, and reports every job of the demo pipeline.

The full organism's figures (README, *First feature page sooner*) take ~14 minutes and are not a test; this
keeps the benchmark's polling in step with the API it reads (a renamed field would leave it polling forever).
"""

from __future__ import annotations

from benchmarks.first_page import main


def test_first_page_benchmark_on_the_tiny_organism(tmp_path, capsys):
    result = main(["--data-dir", str(tmp_path / "data"), "--organism-preset", "organism-tiny",
                   "--preset", "organism-tiny", "--poll", "0.5", "--timeout", "420"])
    out = capsys.readouterr().out
    assert result["first_page_s"] is not None, out
    assert result["page"].startswith("/runs/1/features/"), result
    assert [kind for kind, _ in result["jobs"]] == ["organism", "train", "collect", "evaluate", "hesitation"], out
    assert all(seconds is not None for _, seconds in result["jobs"]), out  # the loop ended with the queue
    assert "first feature page:" in out and "whole demo study:" in out
