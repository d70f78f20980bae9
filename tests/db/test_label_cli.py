"""``adapterlens label``: the built-in rules from the command line, an LLM run without an endpoint refused, bad
options refused with exit code 2 (no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app.cli import app
from app.db.schema import FeatureLabel
from app.db.session import make_engine
from tests.label_world import rules_world


def test_label_command(sqlite_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(sqlite_db_url)
    rules_world(engine, tmp_path / "tok")
    monkeypatch.setenv("DATABASE_URL", sqlite_db_url)
    monkeypatch.setenv("ADAPTERLENS_DATA_DIR", str(tmp_path / "data"))
    for var in ("ADAPTERLENS_LABEL_LLM_URL", "ADAPTERLENS_LABEL_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    ok = runner.invoke(app, ["label", "--run", "label-rules"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.output[ok.output.index("{"):])
    assert out["labelled"] == 6 and out["source"] == "builtin" and out["labels_per_s"] > 0
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(FeatureLabel)) == 6
    sample = runner.invoke(app, ["label", "--run", "label-rules", "--per-layer", "2", "--alive-only"])
    assert sample.exit_code == 0 and json.loads(sample.output[sample.output.index("{"):])["labelled"] == 2
    for args, says in ((["--labeler", "gpt"], "builtin or llm"), (["--layers", "a,b"], "integers"),
                       (["--labeler", "llm"], "endpoint URL and a model")):
        bad = runner.invoke(app, ["label", "--run", "label-rules", *args])
        assert bad.exit_code == 2 and says in bad.output, (args, bad.output)
    engine.dispose()
