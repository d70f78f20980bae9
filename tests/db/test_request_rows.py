"""Ablation and experiment rows agree with their job through every change made outside the handler:
a lease that lapsed on the last attempt, a failed attempt (retried or final), a release, a cancel, a retry,
and a result that arrives after a cancel. Released or retried requests show no partial results."""

from __future__ import annotations

import time

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import Ablation, AblationToken, Experiment, ExperimentRow, JobStatus, Run


def _request(engine: Engine, *, max_attempts: int = 2) -> tuple[int, int, int, int]:
    """(ablation id, its job, experiment id, its job), each request row with one child row."""
    with Session(engine) as s, s.begin():
        run = Run(name="r", base_model="b", target_model="t")
        s.add(run)
        s.flush()
        a = Ablation(run_id=run.id, status="todo", request={})
        e = Experiment(run_id=run.id, name="e", status="todo", request={})
        s.add_all([a, e])
        s.flush()
        a.job_id = queue.enqueue(s, "ablate", {"ablation_id": a.id}, max_attempts=max_attempts, priority=100)
        e.job_id = queue.enqueue(s, "experiment", {"experiment_id": e.id}, max_attempts=max_attempts)
        return a.id, a.job_id, e.id, e.job_id


def _start(engine: Engine, ablation_id: int, experiment_id: int) -> None:
    """What the handlers do when they start: rows running, partial results written."""
    with Session(engine) as s, s.begin():
        s.get(Ablation, ablation_id).status = "running"
        s.get(Experiment, experiment_id).status = "running"
        s.add(AblationToken(ablation_id=ablation_id, condition="ablated", step=0, token_id=1, token_str="x"))
        s.add(ExperimentRow(experiment_id=experiment_id, prompt_idx=0, condition="ablated", response_len=1,
                            hesitations=0, meta={}))


def _state(engine: Engine, ablation_id: int, experiment_id: int) -> tuple[str, str, int, int, str | None]:
    with Session(engine) as s:
        a, e = s.get(Ablation, ablation_id), s.get(Experiment, experiment_id)
        tokens = s.scalar(select(func.count()).select_from(AblationToken).where(AblationToken.ablation_id == a.id))
        rows = s.scalar(select(func.count()).select_from(ExperimentRow).where(ExperimentRow.experiment_id == e.id))
        return a.status, e.status, tokens, rows, a.error


def test_lapsed_lease_on_the_last_attempt_fails_the_rows(db_engine: Engine) -> None:
    a, a_job, e, e_job = _request(db_engine, max_attempts=1)
    for _ in range(2):
        assert queue.claim_job(db_engine, "w-dead", lease_s=0.05) is not None
    _start(db_engine, a, e)
    time.sleep(0.1)
    assert queue.reap(db_engine) == 2
    status_a, status_e, tokens, rows, error = _state(db_engine, a, e)
    assert (status_a, status_e) == ("failed", "failed") and "stopped answering" in error
    assert (tokens, rows) == (1, 1)  # what the dead attempt wrote stays visible with its failure


def test_release_and_retried_failures_show_a_waiting_request_without_partial_results(db_engine: Engine) -> None:
    a, a_job, e, e_job = _request(db_engine)
    queue.claim_job(db_engine, "w")
    queue.claim_job(db_engine, "w")
    _start(db_engine, a, e)
    assert queue.release(db_engine, a_job, "w")
    assert queue.fail(db_engine, e_job, "Traceback ...\nRuntimeError: first attempt", worker_id="w") is JobStatus.TODO
    assert _state(db_engine, a, e) == ("todo", "todo", 0, 0, None)

    queue.claim_job(db_engine, "w")
    queue.claim_job(db_engine, "w")
    _start(db_engine, a, e)
    assert queue.fail(db_engine, e_job, "Traceback ...\nRuntimeError: second", worker_id="w") is JobStatus.FAILED
    with Session(db_engine) as s:
        assert s.get(Experiment, e).status == "failed" and s.get(Experiment, e).error == "RuntimeError: second"
    assert queue.retry(db_engine, e_job)
    assert _state(db_engine, a, e)[1] == "todo" and _state(db_engine, a, e)[3] == 0


def test_cancel_keeps_what_was_generated_and_a_late_result_does_not_undo_it(db_engine: Engine) -> None:
    a, a_job, e, e_job = _request(db_engine)
    assert queue.cancel(db_engine, e_job)  # never started: the row must not wait forever
    with Session(db_engine) as s:
        assert s.get(Experiment, e).status == "cancelled"
    queue.claim_job(db_engine, "w")
    _start(db_engine, a, e)
    assert queue.cancel(db_engine, a_job)
    assert _state(db_engine, a, e)[0] == "cancelled" and _state(db_engine, a, e)[2] == 1
    with Session(db_engine) as s, s.begin():  # the handler finished before it saw the cancel
        s.get(Ablation, a).status = "done"
    assert queue.complete(db_engine, a_job, {"ok": True}, worker_id="w") is False
    assert _state(db_engine, a, e)[0] == "cancelled"
