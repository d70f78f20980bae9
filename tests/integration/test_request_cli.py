"""`adapterlens lens` and `adapterlens experiment` on the tiny trained run: the same requests and jobs as the
dashboard's, run in the foreground."""

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
    assert bad.exit_code == 2 and "Cannot read feature 'x'" in bad.output
    empty = runner.invoke(app, ["lens", "--run", "1", "  "])
    assert empty.exit_code == 2 and "empty" in empty.output


def test_experiment_command_runs_the_request_now(tiny_run_settings, tmp_path, monkeypatch):
    """`adapterlens experiment` queues the dashboard's experiment request and drains it in the foreground: a
    stored set's necessity experiment ends done with its summary; an unknown set is a clear error."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.cli import app
    from app.db.schema import Experiment, FeatureSet, FeatureSetMember

    db = tmp_path / "adapterlens.db"
    shutil.copy(tiny_run_settings.data_dir / "adapterlens.db", db)
    engine = create_engine(f"sqlite:///{db}")
    with Session(engine) as s, s.begin():
        fs = FeatureSet(run_id=1, name="two features")
        s.add(fs)
        s.flush()
        s.add_all([FeatureSetMember(set_id=fs.id, layer=0, index=1), FeatureSetMember(set_id=fs.id, layer=1, index=2)])
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("ADAPTERLENS_DATA_DIR", str(tiny_run_settings.data_dir))
    runner = CliRunner()
    ok = runner.invoke(app, ["experiment", "--run", "1", "--set", "two features", "--organism-heldout", "3",
                             "--max-new-tokens", "4"])
    assert ok.exit_code == 0, ok.output
    assert "experiment 1 queued as job" in ok.output
    summary = json.loads(ok.output[ok.output.index("{"):ok.output.rindex("}") + 1])
    with Session(engine) as s:
        row = s.get(Experiment, 1)
        assert row.status == "done" and row.summary == summary
    missing = runner.invoke(app, ["experiment", "--run", "1", "--set", "no such set"])
    assert missing.exit_code == 2 and "unknown feature set 'no such set'" in missing.output
    engine.dispose()
