"""``adapterlens import-graph``: a circuit-tracer file into a run (new or existing), refused files say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app.cli import app
from app.db.migrate import upgrade
from app.db.schema import Graph, Run
from app.db.session import make_engine

DATA = Path(__file__).resolve().parents[1] / "data" / "circuit-tracer"


def test_import_graph_command(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upgrade(db_url)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("ADAPTERLENS_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    ok = runner.invoke(app, ["import-graph", str(DATA / "ct-tiny-old-ids.json"), "--new-run", "foreign"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.output[ok.output.index("{"):])
    assert out["n_nodes"] == 23 and out["n_links"] == 78 and out["page"].endswith(f"/graphs/{out['graph_id']}")
    again = runner.invoke(app, ["import-graph", str(DATA / "ct-tiny-new-ids.json"), "--run", "foreign",
                                "--slug", "ct-tiny-old-ids"])  # same slug: replaces, same ids after import
    assert again.exit_code == 0, again.output
    engine = make_engine(db_url)
    try:
        with Session(engine) as s:
            run = s.scalar(select(Run).where(Run.name == "foreign"))
            graphs = s.scalars(select(Graph).where(Graph.run_id == run.id)).all()
            assert run.status == "imported" and len(graphs) == 1
            assert {n["node_id"] for n in graphs[0].nodes} >= {"0_-1_2", "1_-1_5"}
    finally:
        engine.dispose()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"metadata": {"slug": "x"}, "nodes": [], "links": []}))
    refused = runner.invoke(app, ["import-graph", str(bad), "--run", "foreign"])
    assert refused.exit_code == 2 and "not a circuit-tracer graph file" in refused.output
    missing = runner.invoke(app, ["import-graph", str(tmp_path / "nope.json"), "--run", "foreign"])
    assert missing.exit_code == 2 and "no file" in missing.output
