"""``POST /api/pipelines``: a user's pair queued as a run and its four jobs, only with paths the API may name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.schema import Job, Run
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from app.web import create_app
from tests.web.conftest import BASE_URL


def _pair(root: Path) -> dict[str, str]:
    for name in ("base", "target"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    (root / "texts.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "hi", "answer": "1"}) + "\n")
    return {"base": str(root / "base"), "target": str(root / "target"), "data": str(root / "texts.jsonl")}


@pytest.fixture
def client(db_url: str, tmp_path: Path):
    engine = make_engine(db_url)
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data", api_allowed_paths=[tmp_path / "models"],
                        api_allowed_models=["deepseek-ai/*"])
    with TestClient(create_app(settings, engine=engine), base_url=BASE_URL, headers={"Origin": BASE_URL}) as c:
        yield c, engine, tmp_path
    engine.dispose()


def test_a_pair_under_the_data_directory_is_queued(client) -> None:
    c, engine, tmp = client
    body = _pair(tmp / "data" / "pair") | {"prompts": "pair/prompts.jsonl", "name": "mine", "base": "pair/base",
                                           "hesitation_words": ["Wait", "Hmm,"], "overrides": ["max_steps=5"]}
    r = c.post("/api/pipelines", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert list(out["jobs"]) == ["train", "collect", "evaluate", "hesitation"] and out["url"] == f"/runs/{out['run_id']}"
    with make_sessionmaker(engine)() as s:
        run = s.get(Run, out["run_id"])
        jobs = s.scalars(select(Job).where(Job.run_id == run.id).order_by(Job.id)).all()
    assert run.name == "mine" and run.config["hesitation_words"] == ["Wait", "Hmm"]
    assert run.base_model == str((tmp / "data" / "pair" / "base").resolve())  # relative paths: the data directory
    assert run.config["train"]["max_steps"] == 5 and run.config["preset"] == "organism"
    assert run.config["data"]["prompts_path"] == str((tmp / "data" / "pair" / "prompts.jsonl").resolve())
    assert [j.kind for j in jobs] == ["train", "collect", "evaluate", "hesitation"]
    assert [j.depends_on for j in jobs[1:]] == [j.id for j in jobs[:-1]]  # each waits for the one before
    again = c.post("/api/pipelines", json=body)
    assert again.status_code == 409 and "exists" in again.json()["detail"]


def test_allowed_paths_and_models(client) -> None:
    c, _, tmp = client
    body = _pair(tmp / "models") | {"target": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}
    assert c.post("/api/pipelines", json=body).status_code == 201, "an allowed directory and an allowed hub id"


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"data": "/etc/passwd"}, 403, "outside the data directory"),
    ({"base": "../outside/base"}, 403, "outside the data directory"),
    ({"target": "Qwen/Qwen2.5-Math-7B"}, 403, "not in the allowed models"),
    ({"prompts": "pair/missing.jsonl"}, 404, "no file"),
    ({"base": "pair"}, 404, "no model directory"),
    ({"overrides": ["nonsense=1"]}, 400, "unknown"),
    ({"preset": "huge"}, 400, "unknown training preset"),
    ({"chat_format": "no placeholder"}, 422, "placeholder"),
    ({"hesitation_words": [",,"]}, 422, "letters"),
    ({"name": "../evil"}, 422, "name"),
])
def test_refused_requests_store_nothing(client, change: dict, status: int, message: str) -> None:
    c, engine, tmp = client
    (tmp / "outside" / "base").mkdir(parents=True)
    (tmp / "outside" / "base" / "config.json").write_text("{}")
    r = c.post("/api/pipelines", json=_pair(tmp / "data" / "pair") | change)
    assert r.status_code == status, r.text
    assert message in json.dumps(r.json())
    with make_sessionmaker(engine)() as s:
        assert s.scalar(select(Run.id)) is None and s.scalar(select(Job.id)) is None


def test_a_symlink_cannot_lead_out_of_the_data_directory(client) -> None:
    c, _, tmp = client
    body = _pair(tmp / "data" / "pair")
    secret = tmp / "secret.jsonl"
    secret.write_text(json.dumps({"text": "x"}) + "\n")
    (tmp / "data" / "link.jsonl").symlink_to(secret)
    r = c.post("/api/pipelines", json=body | {"data": "link.jsonl"})
    assert r.status_code == 403
