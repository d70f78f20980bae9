"""The job queue's named queries on both backends: claim order, leases, failures, dependencies."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import Job, JobStatus, Run, utcnow


def _claim_ids(engine: Engine, worker: str = "w", **kw) -> list[int]:
    ids = []
    while (job := queue.claim_job(engine, worker, **kw)) is not None:
        ids.append(job.id)
    return ids


def test_enqueue_in_caller_transaction(db_engine: Engine) -> None:
    with Session(db_engine) as session:
        run = Run(name="r", base_model="b", target_model="t")
        session.add(run)
        session.flush()
        job_id = queue.enqueue(session, "train", {"run_id": run.id}, run_id=run.id)
        session.rollback()  # the job goes with the transaction it was enqueued in
    assert queue.get_job(db_engine, job_id) is None
    with Session(db_engine) as session, session.begin():
        job_id = queue.enqueue(session, "train", {"x": 1})
    job = queue.get_job(db_engine, job_id)
    assert job is not None and job.status is JobStatus.TODO and job.payload == {"x": 1} and job.attempts == 0


def test_priority_then_id_order(db_engine: Engine) -> None:
    ids = [queue.enqueue(db_engine, "k", {"i": i}, priority=p) for i, p in enumerate([0, 5, 1, 5])]
    assert _claim_ids(db_engine) == [ids[1], ids[3], ids[2], ids[0]]


def test_kinds_filter_and_run_after(db_engine: Engine) -> None:
    a = queue.enqueue(db_engine, "a")
    queue.enqueue(db_engine, "b")
    later = queue.enqueue(db_engine, "a", run_after=utcnow() + timedelta(hours=1))
    assert _claim_ids(db_engine, kinds=["a"]) == [a]
    assert queue.claim_job(db_engine, "w", kinds=[]) is None
    assert queue.get_job(db_engine, later).status is JobStatus.TODO


def test_claim_sets_lease_and_counts_attempt(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k", max_attempts=5)
    job = queue.claim_job(db_engine, "w1", lease_s=30)
    assert job is not None and job.id == job_id
    assert job.status is JobStatus.RUNNING and job.locked_by == "w1" and job.attempts == 1
    assert timedelta(seconds=25) < job.locked_until - utcnow() <= timedelta(seconds=30)
    assert queue.claim_job(db_engine, "w2") is None  # held


def test_lapsed_lease_is_reclaimed_and_old_holder_is_locked_out(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k")
    assert queue.claim_job(db_engine, "dead", lease_s=0.2).id == job_id
    assert queue.claim_job(db_engine, "alive") is None
    time.sleep(0.3)
    again = queue.claim_job(db_engine, "alive")
    assert again is not None and again.id == job_id and again.attempts == 2 and again.locked_by == "alive"
    assert not queue.heartbeat(db_engine, job_id, "dead")
    assert not queue.complete(db_engine, job_id, {"by": "dead"}, worker_id="dead")
    assert queue.heartbeat(db_engine, job_id, "alive")
    assert queue.complete(db_engine, job_id, {"by": "alive"}, worker_id="alive")
    done = queue.get_job(db_engine, job_id)
    assert done.status is JobStatus.SUCCEEDED and done.result == {"by": "alive"} and done.locked_by is None


def test_lapsed_lease_on_last_attempt_fails(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k", max_attempts=1)
    queue.claim_job(db_engine, "dead", lease_s=0.1)
    time.sleep(0.2)
    assert queue.claim_job(db_engine, "w") is None
    job = queue.get_job(db_engine, job_id)
    assert job.status is JobStatus.FAILED and "Lease expired" in job.error


def test_heartbeat_extends_lease(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k")
    queue.claim_job(db_engine, "w1", lease_s=0.3)
    for _ in range(3):
        time.sleep(0.15)
        assert queue.heartbeat(db_engine, job_id, "w1", lease_s=0.3)
    assert queue.claim_job(db_engine, "w2") is None


def test_fail_retries_until_max_attempts(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k", max_attempts=2)
    queue.claim_job(db_engine, "w")
    assert queue.fail(db_engine, job_id, "Traceback: first", worker_id="w") is JobStatus.TODO
    job = queue.claim_job(db_engine, "w")
    assert job.id == job_id and job.attempts == 2 and job.error == "Traceback: first"
    assert queue.fail(db_engine, job_id, "Traceback: second", worker_id="w") is JobStatus.FAILED
    failed = queue.get_job(db_engine, job_id)
    assert failed.status is JobStatus.FAILED and failed.error == "Traceback: second" and failed.finished
    assert queue.claim_job(db_engine, "w") is None
    assert queue.retry(db_engine, job_id)
    assert queue.claim_job(db_engine, "w").attempts == 1


def test_permanent_failure_skips_retries(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k", max_attempts=3)
    queue.claim_job(db_engine, "w")
    assert queue.fail(db_engine, job_id, "bad payload", permanent=True) is JobStatus.FAILED


def test_release_does_not_count_an_attempt(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k")
    queue.claim_job(db_engine, "w")
    assert not queue.release(db_engine, job_id, "someone-else")
    assert queue.release(db_engine, job_id, "w")
    job = queue.get_job(db_engine, job_id)
    assert job.status is JobStatus.TODO and job.attempts == 0 and job.locked_by is None


def test_cancel(db_engine: Engine) -> None:
    waiting = queue.enqueue(db_engine, "k")
    running = queue.enqueue(db_engine, "k", priority=1)
    assert queue.claim_job(db_engine, "w").id == running
    assert not queue.is_cancelled(db_engine, running)
    assert queue.cancel(db_engine, waiting) and queue.cancel(db_engine, running)
    assert queue.is_cancelled(db_engine, running) and queue.is_cancelled(db_engine, waiting)
    assert queue.claim_job(db_engine, "w") is None
    assert not queue.complete(db_engine, running, {"late": True}, worker_id="w")  # stays cancelled
    assert queue.get_job(db_engine, running).status is JobStatus.CANCELLED
    assert not queue.cancel(db_engine, running)  # already finished


def test_depends_on_waits_for_success(db_engine: Engine) -> None:
    first = queue.enqueue(db_engine, "k")
    second = queue.enqueue(db_engine, "k", depends_on=first, priority=10)
    assert queue.claim_job(db_engine, "w").id == first  # the high-priority dependent waits
    assert queue.claim_job(db_engine, "w") is None
    queue.complete(db_engine, first, None)
    assert queue.claim_job(db_engine, "w").id == second


def test_dependency_failure_propagates_and_retry_resumes_chain(db_engine: Engine) -> None:
    a = queue.enqueue(db_engine, "k", max_attempts=1)
    b = queue.enqueue(db_engine, "k", depends_on=a)
    c = queue.enqueue(db_engine, "k", depends_on=b)
    queue.claim_job(db_engine, "w")
    queue.fail(db_engine, a, "boom", worker_id="w")
    for dependent in (b, c):
        job = queue.get_job(db_engine, dependent)
        assert job.status is JobStatus.FAILED and job.error.startswith(queue.DEPENDENCY_FAILED)
    assert queue.retry(db_engine, a)
    assert [queue.get_job(db_engine, j).status for j in (a, b, c)] == [JobStatus.TODO] * 3
    assert _claim_ids(db_engine) == [a]


def test_progress(db_engine: Engine) -> None:
    job_id = queue.enqueue(db_engine, "k")
    queue.set_progress(db_engine, job_id, 3, 10, "collecting")
    assert queue.get_job(db_engine, job_id).progress == {"done": 3, "total": 10, "message": "collecting"}


@pytest.mark.parametrize("n_workers", [8])
def test_concurrent_workers_never_share_a_job(db_engine: Engine, n_workers: int) -> None:
    n_jobs = 60
    ids = [queue.enqueue(db_engine, "k", {"i": i}, priority=i % 3) for i in range(n_jobs)]
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(n_workers)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_workers)

    def work(name: str) -> None:
        try:
            barrier.wait()
            while (job := queue.claim_job(db_engine, name)) is not None:
                claimed[name].append(job.id)
                assert queue.complete(db_engine, job.id, {"by": name}, worker_id=name)
        except BaseException as exc:  # noqa: BLE001 (asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    everything = [i for got in claimed.values() for i in got]
    assert sorted(everything) == ids  # each job exactly once
    with Session(db_engine) as session:
        rows = session.execute(select(Job.id, Job.result, Job.attempts)).all()
    assert all(r.attempts == 1 and r.id in claimed[r.result["by"]] for r in rows)


def test_listener_wakes_on_enqueue(db_engine: Engine) -> None:
    with queue.JobListener(db_engine) as listener:
        t0 = time.monotonic()
        assert not listener.wait(0.3)
        assert time.monotonic() - t0 >= 0.29
        timer = threading.Timer(0.2, lambda: queue.enqueue(db_engine, "k"))
        timer.start()
        t0 = time.monotonic()
        assert listener.wait(10)
        assert time.monotonic() - t0 < 3
        timer.join()
    stop = threading.Event()
    stop.set()
    assert queue.wait_for_job(db_engine, 10, kinds=["other"], stop=stop) is False


def test_workers_table(db_engine: Engine) -> None:
    queue.register_worker(db_engine, "w1", "host", 123)
    queue.worker_heartbeat(db_engine, "w1")
    assert queue.prune_workers(db_engine, older_than_s=3600) == 0
    time.sleep(0.05)
    assert queue.prune_workers(db_engine, older_than_s=0.01) == 1
    queue.register_worker(db_engine, "w2", "host", 124)
    queue.unregister_worker(db_engine, "w2")
    assert queue.prune_workers(db_engine, older_than_s=0) == 0
