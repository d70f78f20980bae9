"""`adapterlens lens` on the tiny trained run: the same request and job as the Lens page, run in the foreground."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner


def test_cli_lens(tiny_run_settings, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli import app

    db = tmp_path / "adapterlens.db"  # a copy: the shared store stays as other tests expect it
    shutil.copy(tiny_run_settings.data_dir / "adapterlens.db", db)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("ADAPTERLENS_DATA_DIR", str(tiny_run_settings.data_dir))
    runner = CliRunner()
    ok = runner.invoke(app, ["lens", "--run", "1", "--feature", "0:1", "86 + 87 = ?"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.output[ok.output.index("{"):ok.output.rindex("}") + 1])
    assert summary["n_tokens"] > 5 and summary["mean_kl_hybrid"] >= 0 and "/runs/1/lens/1" in ok.output
    again = runner.invoke(app, ["lens", "--run", "1", "--token-ids", "1 2 3"])
    assert again.exit_code == 0, again.output
    bad = runner.invoke(app, ["lens", "--run", "1", "--feature", "x", "a"])
    assert bad.exit_code == 2 and "cannot read feature" in bad.output
    empty = runner.invoke(app, ["lens", "--run", "1", "  "])
    assert empty.exit_code == 2 and "empty" in empty.output
