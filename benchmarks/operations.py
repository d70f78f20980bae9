"""Operations, in one run on a throwaway Postgres cluster: reconnecting after a database restart, and an
ablation's time to first token while a long job runs, against the same on idle workers.

Two worker processes as ``adapterlens up`` runs them (``app.supervisor.worker_classes``: one for the interactive
kinds, one for the rest, torch threads adding up to the cores), serving a tiny random adapter model built in
memory (``--shape``, the organism's by default; model loading is not counted):

1. **Reconnect**: ``pg_ctl restart -m fast`` (every session terminated) under the two idle workers; then a job
   is queued the moment the server accepts connections again. Printed: how long the server was down, and
   queue → claimed for that job (the workers' backoff included) against queue → claimed on a steady database.
2. **Time to first token**: an ablation submitted as the API does (``submit_ablation`` + commit), timed from the
   commit to its first token visible to a reader, on idle workers and then while the long-job worker runs a
   job that keeps its torch threads busy (matrix products, like a training step), median of ``--ablations``.

    python -m benchmarks.operations                  # from the repository root (imports tests.pg_cluster)
    python -m benchmarks.operations --shape small --ablations 9
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, pool, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from app.db import queue
from app.db.migrate import upgrade
from app.db.requests import AblationLimits, submit_ablation
from app.db.schema import AblationToken, Job, JobStatus, Run, Worker, utcnow
from app.db.session import make_engine
from app.supervisor import worker_classes
from tests.pg_cluster import ThrowawayCluster, pg_bindir

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.002  # seconds between the client's looks
WAIT_S = 120.0  # seconds before a step is declared stuck
SHAPES = ("organism", "small", "wide")


# ------------------------------------------------------------------------------------- worker process


def run_bench_worker(url: str, shape: str, kinds: str | None, exclude: str | None) -> None:
    """A worker process serving the benchmark's model (``python -m benchmarks.operations worker …``)."""
    import torch
    from pydantic import BaseModel

    from app.settings import Settings
    from benchmarks.ablation import SHAPES as MODEL_SHAPES
    from benchmarks.ablation import build_model
    from training.organism.tasks import corpus
    from training.organism.tokenizer import train_tokenizer
    from worker.ablation.job import use_model_loader
    from worker.handlers import JobContext, register
    from worker.loop import run_worker

    class Burn(BaseModel):
        seconds: float = 600.0

    @register("bench.burn", Burn)
    def burn(ctx: JobContext) -> dict:
        """A long job: matrix products on every torch thread this worker has, until done or cancelled."""
        a = torch.randn(768, 768)
        start, steps = time.monotonic(), 0
        while time.monotonic() - start < ctx.payload.seconds:
            for _ in range(4):
                a = torch.tanh(a @ a.T / 768)
            steps += 1
            ctx.progress(time.monotonic() - start, ctx.payload.seconds, "burning")
            ctx.check()
        return {"steps": steps}

    class Noop(BaseModel):
        pass

    @register("bench.noop", Noop)
    def noop(ctx: JobContext) -> None:
        return None

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    tokenizer = train_tokenizer(corpus(0, 60))
    model = build_model(MODEL_SHAPES[shape], len(tokenizer))
    with use_model_loader(lambda _ctx, _run_id: (model, tokenizer)):
        run_worker(Settings(database_url=url, data_dir=Path(tempfile.mkdtemp(prefix="adapterlens-bench-"))),
                   kinds=kinds.split(",") if kinds else None, exclude_kinds=exclude.split(",") if exclude else None, handler_modules=["worker.ablation.job"],
                   migrate=False, idle_wait_s=5.0)


# ------------------------------------------------------------------------------------------- helpers


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 (our own connection meets the restart too)
            pass
        time.sleep(POLL_S)
    raise SystemExit(f"stuck waiting for {what}")


def _claim_latency(engine: Engine, kind: str = "bench.noop") -> float:
    """Seconds from committing a job to a worker's claim (``jobs.started``, the same clock)."""
    queued = None

    def enqueue() -> bool:
        nonlocal queued
        queued, job = utcnow(), queue.enqueue(engine, kind, {})
        box.append(job)
        return True

    box: list[int] = []
    _until(enqueue, "the database to take a job")
    job_id = box[-1]
    _until(lambda: queue.get_job(engine, job_id).started is not None, "the job to be claimed")
    return (queue.get_job(engine, job_id).started - queued).total_seconds()


def _ttft(engine: Engine, run_id: int, i: int, max_new_tokens: int) -> float:
    """Seconds from committing an ablation to its first token visible to a reader."""
    request = {"run_id": run_id, "prompt": f"{i} + 17 = ?", "features": [[0, 1], [1, 2]],
               "generation": {"max_new_tokens": max_new_tokens}}
    with Session(engine) as s, s.begin():
        ablation_id, _ = submit_ablation(s, request, limits=AblationLimits(queue_per_run=1000, queue_total=1000))
    t0 = time.perf_counter()
    query = select(AblationToken.step).where(AblationToken.ablation_id == ablation_id).limit(1)
    with engine.connect() as conn:
        while conn.execute(query).first() is None:
            if time.perf_counter() - t0 > WAIT_S:
                raise SystemExit("stuck waiting for a first token")
            time.sleep(POLL_S)
            conn.rollback()
    return time.perf_counter() - t0


def _median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f} ms (n={len(values)}, min {1000 * min(values):.0f}, " \
           f"max {1000 * max(values):.0f})"


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="organism")
    parser.add_argument("--ablations", type=int, default=7, help="ablations timed per condition")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bindir = pg_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (no initdb): the benchmark restarts a cluster of its own")
    cluster = ThrowawayCluster(bindir)
    procs: list[subprocess.Popen] = []
    try:
        cluster.init()
        cluster.start()
        admin = create_engine(cluster.url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
        name = f"bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(cluster.url).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        engine = make_engine(url)
        from benchmarks.ablation import SHAPES as MODEL_SHAPES

        shape = MODEL_SHAPES[args.shape]
        with Session(engine) as s, s.begin():
            run = Run(name="bench", base_model="b", target_model="t", n_layers=shape["layers"],
                      n_features=shape["features"])
            s.add(run)
            s.flush()
            run_id = run.id
        specs = worker_classes(1, 1)
        for spec in specs:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAPTERLENS_TORCH_THREADS": str(spec.threads),
                   "OMP_NUM_THREADS": str(spec.threads)}
            cmd = [sys.executable, "-m", "benchmarks.operations", "worker", url, args.shape,
                   ",".join(spec.kinds or ()), ",".join(spec.exclude_kinds or ())]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
        with Session(engine) as s:
            _until(lambda: s.scalar(select(Worker.id).where(Worker.id.is_not(None)).offset(1).limit(1)) is not None,
                   "both workers to start")
        print(f"shape {args.shape}: {shape}; workers: "
              + ", ".join(f"{s.name} ({s.threads} torch thread{'s' if s.threads > 1 else ''})" for s in specs)
              + f"; {os.cpu_count()} cores")

        # 1. reconnect after a restart
        steady = [_claim_latency(engine) for _ in range(5)]
        downs, claims = [], []
        for _ in range(args.restarts):
            time.sleep(1.0)
            t0 = time.perf_counter()
            cluster.restart()
            downs.append(time.perf_counter() - t0)
            engine.dispose()
            claims.append(_claim_latency(engine))
        print(f"reconnect: pg_ctl restart -m fast took {_median_ms(downs)}; a job queued as the server came back "
              f"was claimed after {_median_ms(claims)}, against {_median_ms(steady)} on a steady database "
              f"({statistics.median(claims) / statistics.median(steady):.1f}x)")

        # 2. time to first token, idle and under a long job
        _ttft(engine, run_id, 0, args.max_new_tokens)  # warm-up
        idle = [_ttft(engine, run_id, i, args.max_new_tokens) for i in range(1, args.ablations + 1)]
        burn = queue.enqueue(engine, "bench.burn", {"seconds": 600})
        _until(lambda: queue.get_job(engine, burn).status is JobStatus.RUNNING, "the long job to run")
        time.sleep(2.0)  # let it reach full speed
        busy = [_ttft(engine, run_id, i, args.max_new_tokens) for i in range(1, args.ablations + 1)]
        assert queue.get_job(engine, burn).status is JobStatus.RUNNING, "the long job must run throughout"
        queue.cancel(engine, burn)
        print(f"ablation time to first token: idle workers {_median_ms(idle)}; while the long-job worker runs "
              f"a job on its threads {_median_ms(busy)} ({statistics.median(busy) / statistics.median(idle):.2f}x)")
        finished = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

        def ablations(*statuses: JobStatus) -> list[int]:
            with Session(engine) as s:
                return list(s.scalars(select(Job.id).where(Job.kind == "ablate", Job.status.in_(statuses))))

        _until(lambda: not ablations(JobStatus.TODO, JobStatus.RUNNING), "the ablations to finish")
        bad = ablations(*finished[1:])
        print(f"all {len(ablations(*finished))} ablations succeeded" if not bad else f"ablation jobs {bad} failed")
        engine.dispose()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.remove()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        run_bench_worker(sys.argv[2], sys.argv[3], sys.argv[4] or None, sys.argv[5] or None)
    else:
        main()
