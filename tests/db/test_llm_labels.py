"""The LLM labeler against a real local HTTP server (an OpenAI-compatible ``/v1/chat/completions`` started here,
answering like a judge that can read): the prompts hold the stored examples, 429 and 5xx are retried, a crashed
labelling resumes where it stopped, and detection scores are stored; also the ``label`` job and the rate limit."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureLabel
from app.db.session import make_engine
from app.labels.llm import LLMError, LLMLabeler
from app.labels.run import label_run
from app.settings import Settings
from tests.label_world import judge_world
from worker.loop import run_inline

MODEL = "judge-test-1"


@dataclass
class Judge:
    """What the server does: answers, failures to serve first, and a log of every request body."""

    requests: list[dict] = field(default_factory=list)
    auth: set[str | None] = field(default_factory=set)
    statuses: list[int] = field(default_factory=list)  # answered in order before any 200 (e.g. [429, 503])
    fail_after: int | None = None  # after this many 200s, answer 500 for ever (the endpoint "crashes")
    ok: int = 0
    garbage: bool = False  # answer prose instead of the JSON asked for
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.requests.append(body)
            if self.statuses:
                return self.statuses.pop(0), {"error": "busy"}
            if self.fail_after is not None and self.ok >= self.fail_after:
                return 500, {"error": "down"}
            self.ok += 1
        prompt = body["messages"][-1]["content"]
        if self.garbage:
            text = "I think it is about numbers, maybe? None of them." if prompt.startswith("Describe") else "none"
        elif prompt.startswith("Describe"):
            if "<<< Wait>>>" in prompt:
                content = {"description": "hedges with Wait right after stating an answer, before rechecking",
                           "category": "reasoning", "subcategory": "input_simple"}
            else:
                content = {"description": "digits and operators of written sums", "category": "domain",
                           "subcategory": "math"}
            text = "Sure. " + json.dumps(content)
        else:  # detection: the excerpts that hold "Wait"
            excerpts = re.findall(r"^(\d+)\. (.*)$", prompt, re.M)
            text = json.dumps([int(n) for n, line in excerpts if "Wait" in line])
        return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def judge() -> Iterator[tuple[Judge, str]]:
    state = Judge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.auth.add(self.headers.get("Authorization"))
            status, payload = state.answer(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _labeler(url: str, **kw) -> LLMLabeler:
    return LLMLabeler(url, MODEL, rps=kw.pop("rps", 1000.0), backoff_s=kw.pop("backoff_s", 0.01), **kw)


def test_prompts_scores_and_retries(db_url: str, tmp_path: Path, judge) -> None:
    state, url = judge
    state.statuses = [429, 503, 500]  # the first request is answered only on its fourth try
    engine = make_engine(db_url)
    llm = _labeler(url, batch_size=3)
    try:
        rid = judge_world(engine, tmp_path / "tok")
        out = label_run(engine, rid, labeler="llm", llm=llm)
        assert out == out | {"source": MODEL, "labelled": 6, "skipped": 0}
        # the description prompt shows the feature's own stored examples, marked, with the lens
        assert state.requests[0] == state.requests[3]  # the same request, retried
        describe = [r["messages"][-1]["content"] for r in state.requests[3:]
                    if r["messages"][-1]["content"].startswith("Describe")]
        assert len(describe) == 6 and all(r["model"] == MODEL and r["temperature"] == 0 for r in state.requests)
        assert "<<< Wait>>>" in describe[0] and " So0." in describe[0] and "' Wait'" in describe[0]
        assert describe[0].count("(activation ") == 10  # the top 10 of the 15 stored
        assert "<<<" not in "".join(r["messages"][-1]["content"] for r in state.requests[1:]
                                    if not r["messages"][-1]["content"].startswith("Describe"))
        assert len(state.requests) == 3 + 6 * 3  # 3 failed tries; per feature: describe + 2 detection queries
        with Session(engine) as s:
            rows = {r.index: r for r in s.scalars(select(FeatureLabel).where(FeatureLabel.source == MODEL))}
            wait = rows[0]
            assert (wait.category, wait.subcategory) == ("reasoning", "input_simple") and "Wait" in wait.label
            assert wait.score == 1.0  # it picked exactly the five positives of both queries
            for q in wait.details["detection"]:
                assert q["picked"] == q["positives"] and len(q["positives"]) == 5 and q["recall"] == 1.0
            assert {q["kind"] for q in wait.details["detection"]} == {"top", "random"}
            for i in range(1, 6):  # digit features: the judge finds none of their positives
                r = rows[i]
                assert (r.category, r.subcategory) == ("domain", "math")
                assert r.score < 1.0 and all(q["recall"] == 0.0 for q in r.details["detection"])
                expected = sum(q["accuracy"] for q in r.details["detection"]) / 2
                assert r.score == pytest.approx(expected, abs=1e-4)
            assert s.get(Feature, (rid, 0, 0)).label == wait.label  # the newest labeler's label is the one shown
    finally:
        llm.close()
        engine.dispose()


def test_a_crashed_labelling_resumes(sqlite_db_url: str, tmp_path: Path, judge) -> None:
    state, url = judge
    engine = make_engine(sqlite_db_url)
    try:
        rid = judge_world(engine, tmp_path / "tok")
        state.fail_after = 2 * 3 + 1  # two features' requests succeed, then the endpoint stays down
        llm = _labeler(url, batch_size=1, retries=2)
        with pytest.raises(LLMError, match="failed 3 times"):
            label_run(engine, rid, labeler="llm", llm=llm)
        llm.close()
        with Session(engine) as s:
            assert sorted(s.scalars(select(FeatureLabel.index).where(FeatureLabel.source == MODEL))) == [0, 1]
        state.fail_after, state.requests = None, []
        llm = _labeler(url, batch_size=1)
        out = label_run(engine, rid, labeler="llm", llm=llm)
        llm.close()
        assert out["skipped"] == 2 and out["labelled"] == 4
        described = [r["messages"][-1]["content"] for r in state.requests if r["messages"][-1]["content"].startswith("Describe")]
        assert len(described) == 4 and not any("<<< Wait>>>" in p for p in described)  # feature 0 was not asked again
        with Session(engine) as s:
            assert sorted(s.scalars(select(FeatureLabel.index).where(FeatureLabel.source == MODEL))) == list(range(6))
    finally:
        engine.dispose()


def test_errors_that_are_not_retried_and_the_rate_limit(judge) -> None:
    state, url = judge
    state.statuses = [400]
    llm = _labeler(url)
    with pytest.raises(LLMError, match="400"):
        llm.chat("Describe nothing")
    assert len(state.requests) == 1  # a 4xx other than 429 is the request's fault: no retry
    llm.close()
    llm = _labeler(url, rps=20.0)
    t0 = time.monotonic()
    for _ in range(6):
        llm.chat("Which? 1. a")
    assert time.monotonic() - t0 >= 5 / 20 - 0.01  # six requests at 20 per second take at least 0.25 s
    llm.close()
    with pytest.raises(ValueError, match="URL and a model"):
        LLMLabeler("", "")


def test_label_job_reads_the_endpoint_from_settings(sqlite_db_url: str, tmp_path: Path, judge) -> None:
    state, url = judge
    engine = make_engine(sqlite_db_url)
    try:
        rid = judge_world(engine, tmp_path / "tok", n_digit_features=1)
    finally:
        engine.dispose()
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_db_url, label_llm_url=url,
                        label_llm_model=MODEL, label_llm_key="sekret", label_llm_rps=1000.0)
    out = run_inline(settings, "label", {"run_id": rid, "labeler": "llm"}, show_progress=False,
                     handler_modules=["worker.labels"])
    assert out["labelled"] == 2 and out["source"] == MODEL
    assert len(state.requests) == 6 and state.auth == {"Bearer sekret"}
    again = run_inline(settings, "label", {"run_id": rid, "labeler": "llm"}, show_progress=False,
                       handler_modules=["worker.labels"])
    assert again["labelled"] == 0 and again["skipped"] == 2 and len(state.requests) == 6


def test_answers_that_are_not_the_json_asked_for(sqlite_db_url: str, tmp_path: Path, judge) -> None:
    state, url = judge
    state.garbage = True
    engine = make_engine(sqlite_db_url)
    llm = _labeler(url)
    try:
        rid = judge_world(engine, tmp_path / "tok", n_digit_features=1)
        assert label_run(engine, rid, labeler="llm", llm=llm)["labelled"] == 2
        with Session(engine) as s:
            for r in s.scalars(select(FeatureLabel).where(FeatureLabel.run_id == rid)):
                assert r.label.startswith("I think it is about numbers")  # the prose is the description
                assert (r.category, r.subcategory) == ("uninterpretable", None)
                assert all(q["picked"] == [] and q["recall"] == 0.0 for q in r.details["detection"])
                assert r.score == 0.5  # five negatives rightly left out of ten
    finally:
        llm.close()
        engine.dispose()
