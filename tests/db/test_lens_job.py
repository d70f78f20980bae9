"""The lens through the store and a real worker, on SQLite and Postgres: request, cache, result, refusals."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db import queue
from app.db.lens_request import LENS_PRIORITY, submit_lens, token_key
from app.db.requests import AblationRequestError
from app.db.schema import Job, JobStatus, LensResult, Run
from tests.helpers import randomize_adapters, tiny_qwen2
from training.adapter import AdapterModel, build_adapter_model
from training.chat import format_prompt
from training.config import AdapterConfig
from training.organism.tasks import corpus
from training.organism.tokenizer import train_tokenizer
from worker.ablation.job import encode, use_model_loader
from worker.lens.diff import diff_lens
from worker.loop import run_worker

N_FEATURES = 16
JOB_MODULES = ["worker.lens.job"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(0, 60))


@pytest.fixture(scope="module")
def model(tokenizer) -> AdapterModel:
    vocab = len(tokenizer)
    base, target = tiny_qwen2(0, vocab=vocab), tiny_qwen2(1, vocab=vocab)
    return randomize_adapters(build_adapter_model(base, target, AdapterConfig(n_features=N_FEATURES)), 0)


@pytest.fixture
def run_id(db_engine: Engine) -> int:
    with Session(db_engine) as s, s.begin():
        run = Run(name="tiny", base_model="b", target_model="t", n_layers=2, n_features=N_FEATURES, d_model=32)
        s.add(run)
        s.flush()
        return run.id


@pytest.fixture
def loaded(model, tokenizer):
    with use_model_loader(lambda ctx, run_id: (model, tokenizer)):
        yield


def _submit(engine: Engine, request: dict) -> tuple[int, int | None]:
    with Session(engine) as s, s.begin():
        return submit_lens(s, request)


def _work(settings) -> int:
    return run_worker(settings, wait=False, handler_modules=JOB_MODULES, migrate=False)


def _row(engine: Engine, lens_id: int) -> LensResult:
    with Session(engine) as s:
        return s.get(LensResult, lens_id)


def test_lens_runs_through_the_worker_and_is_cached(db_engine, db_settings, run_id, loaded, model, tokenizer):
    lens_id, job_id = _submit(db_engine, {"run_id": run_id, "prompt": "47 + 38 = ?", "features": [[1, 3]]})
    assert queue.get_job(db_engine, job_id).priority == LENS_PRIORITY
    again, again_job = _submit(db_engine, {"run_id": run_id, "prompt": "47 + 38 = ?", "features": [[1, 3]]})
    assert (again, again_job) == (lens_id, job_id)  # an identical waiting request is reused, no second job
    assert _work(db_settings) == 1
    row = _row(db_engine, lens_id)
    assert row.status == "done" and row.finished is not None and queue.get_job(db_engine, job_id).status is JobStatus.SUCCEEDED
    ids = encode(tokenizer, format_prompt("47 + 38 = ?"))  # the run's chat format, applied once
    direct = diff_lens(model, ids, watch=[(1, 3)]).to_json()
    assert row.result["token_ids"] == ids and row.n_tokens == len(ids) and row.token_key == token_key(ids)
    assert row.result["kl_hybrid"] == pytest.approx(direct["kl_hybrid"])
    assert row.result["features"] == direct["features"] and row.result["top"] == direct["top"]
    assert row.result["watched"]["1/3"] == pytest.approx(direct["watched"]["1/3"])
    assert row.summary["mean_kl_hybrid"] == pytest.approx(sum(direct["kl_hybrid"]) / len(ids))

    # the same ids given explicitly: a new request, but the worker copies the finished result
    by_ids, _ = _submit(db_engine, {"run_id": run_id, "token_ids": ids})
    assert by_ids != lens_id and _submit(db_engine, {"run_id": run_id, "prompt": "47 + 38 = ?",
                                                     "features": [[1, 3]]})[0] == lens_id  # done: reused too
    assert _work(db_settings) == 1
    copied = _row(db_engine, by_ids)
    assert copied.status == "done" and copied.summary["reused_from"] == lens_id and copied.result == row.result
    with Session(db_engine) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == "lens")) == 2


@pytest.mark.parametrize("request_, status", [
    ({"prompt": "  "}, 422),
    ({"prompt": "a", "token_ids": [1]}, 422),
    ({}, 422),
    ({"token_ids": []}, 422),
    ({"token_ids": [-1]}, 422),
    ({"prompt": "a\x00b"}, 422),
    ({"prompt": "a", "features": [[2, 0]]}, 422),  # the run has layers 0..1
    ({"prompt": "a", "features": [[0, N_FEATURES]]}, 422),
    ({"prompt": "a", "bogus": 1}, 422),
])
def test_bad_requests_are_refused_and_store_nothing(db_engine, run_id, request_, status):
    with pytest.raises(AblationRequestError) as err:
        _submit(db_engine, {"run_id": run_id, **request_})
    assert err.value.status_code == status
    with pytest.raises(AblationRequestError) as err:
        _submit(db_engine, {"run_id": run_id + 99, "prompt": "a"})
    assert err.value.status_code == 404
    with Session(db_engine) as s:
        assert s.scalar(select(func.count()).select_from(LensResult)) == 0
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_ids_outside_the_vocabulary_fail_the_job_clearly(db_engine, db_settings, run_id, loaded, tokenizer):
    lens_id, job_id = _submit(db_engine, {"run_id": run_id, "token_ids": [1, 2, 10**6]})
    _work(db_settings)
    row = _row(db_engine, lens_id)
    assert row.status == "failed" and "outside the model's vocabulary" in row.error and row.result is None
    assert queue.get_job(db_engine, job_id).status is JobStatus.FAILED
    assert torch.is_grad_enabled()  # the lens leaves autograd as it found it


def test_a_lens_row_follows_its_job(db_engine, run_id):
    """Cancelled in the queue: the row says so; a retry puts it back to todo with no result."""
    lens_id, job_id = _submit(db_engine, {"run_id": run_id, "token_ids": [1, 2, 3]})
    with Session(db_engine) as s, s.begin():
        assert queue.cancel(s, job_id)
    assert _row(db_engine, lens_id).status == "cancelled"
    with Session(db_engine) as s, s.begin():
        s.get(LensResult, lens_id).result = {"stale": True}
    with Session(db_engine) as s, s.begin():
        queue.retry(s, job_id)
    row = _row(db_engine, lens_id)
    assert row.status == "todo" and row.result is None
    # a cancelled request is not reused: asking again queues a new job
    with Session(db_engine) as s, s.begin():
        assert queue.cancel(s, job_id)
    again, again_job = _submit(db_engine, {"run_id": run_id, "token_ids": [1, 2, 3]})
    assert again != lens_id and again_job != job_id


def test_a_text_longer_than_the_lens_takes_fails_clearly(db_engine, db_settings, run_id, loaded, model, monkeypatch):
    monkeypatch.setattr("worker.lens.job.MAX_LENS_TOKENS", 8)
    lens_id, _ = _submit(db_engine, {"run_id": run_id, "prompt": "47 + 38 = ? and then some more words"})
    _work(db_settings)
    row = _row(db_engine, lens_id)
    assert row.status == "failed" and "the lens takes at most 8" in row.error
