"""Ablation latency and throughput, in one run.

1. **Pickup latency**: an idle worker (``run_worker``, waiting on LISTEN/NOTIFY on Postgres, polling on
   SQLite) and a client that submits an ablation (``submit_ablation`` + commit) and then polls
   ``ablation_tokens`` from its own connection every millisecond. Printed per backend: enqueue → claim
   (``jobs.started``) and enqueue → first token visible to a reader. The model is built once in memory
   (what the worker's model cache gives after the first request), so model loading is not counted.
2. **Generation throughput** of one shape, interleaved reps so machine load hits all alike:
   ``plain`` (our token loop, no intervention), ``hf`` (Hugging Face ``generate``, greedy, for reference),
   ``intervention`` (our loop with a zero-ablation of 5% of every layer's features at every position)
   and ``ablate-job`` (the ``ablate`` job's lockstep batch: ablated + unablated reference for the KL +
   unablated; tokens/s of the ablated stream). Ratios are against ``plain``; the target for
   ``intervention`` is ≥ 0.9. Wall times on a shared machine swing with its load, so tokens/s are also
   given from the 20th percentile of the per-step times, which preemption inflates least.

    python benchmarks/ablation.py                                   # local Postgres + SQLite, organism shape
    python benchmarks/ablation.py --pg-url postgresql://postgres@127.0.0.1:5432/postgres --shape wide
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy import create_engine, pool, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from transformers import Qwen2Config, Qwen2ForCausalLM

from app.db.migrate import upgrade
from app.db.requests import AblationLimits, submit_ablation
from app.db.schema import AblationToken, Job, Run
from app.db.session import make_engine
from app.settings import Settings
from training.adapter import AdapterModel, build_adapter_model
from training.config import AdapterConfig
from training.interventions import Intervention
from training.organism.tasks import corpus
from training.organism.tokenizer import train_tokenizer
from worker.ablation.generate import SamplingSettings, ablation_tracks, lockstep
from worker.ablation.job import use_model_loader
from worker.loop import run_worker

SHAPES = {
    "organism": {"layers": 4, "d": 128, "mlp": 512, "features": 512},
    "small": {"layers": 8, "d": 256, "mlp": 1024, "features": 2048},
    "wide": {"layers": 8, "d": 512, "mlp": 2048, "features": 8192},
}
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
POLL_S = 0.001  # seconds between the client's looks for the first token
IDLE_BEFORE_SUBMIT_S = 0.3  # seconds the worker sits idle (waiting) before each submission


def _qwen(shape: dict, vocab: int, seed: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=shape["d"], intermediate_size=shape["mlp"],
                      num_hidden_layers=shape["layers"], num_attention_heads=max(shape["d"] // 32, 1),
                      num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                      use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


def build_model(shape: dict, vocab: int) -> AdapterModel:
    model = build_adapter_model(_qwen(shape, vocab, 0), _qwen(shape, vocab, 1),
                                AdapterConfig(n_features=shape["features"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking adapters: about half the features fire
        for ad in model.adapters:
            ad.W_dec.copy_(torch.randn(ad.W_dec.shape, generator=g) * 0.1)
            ad.b_enc.copy_(torch.randn(ad.b_enc.shape, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------------------------- pickup latency


def _pickups(url: str, model: AdapterModel, tokenizer, n: int) -> list[tuple[float, float]]:
    """(enqueue → claim, enqueue → first token visible) in seconds, for ``n`` submissions to an idle worker."""
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        run = Run(name="bench", base_model="b", target_model="t", n_layers=model.n_layers,
                  n_features=model.n_features)
        s.add(run)
        s.flush()
        run_id = run.id
    settings = Settings(database_url=url, data_dir=Path(tempfile.mkdtemp(prefix="adapterlens-bench-")))
    stop = threading.Event()
    out = []
    with use_model_loader(lambda _ctx, _run_id: (model, tokenizer)):
        worker = threading.Thread(target=run_worker, args=(settings,), daemon=True,
                                  kwargs={"kinds": ["ablate"], "stop_event": stop, "migrate": False,
                                          "handler_modules": ["worker.ablation.job"]})
        worker.start()
        try:
            for i in range(n + 1):  # the first is a warm-up
                time.sleep(IDLE_BEFORE_SUBMIT_S)
                request = {"run_id": run_id, "prompt": f"{i} + 1 = ?", "features": [[0, 1]],
                           "generation": {"max_new_tokens": 4}}
                with Session(engine) as s, s.begin():
                    ablation_id, job_id = submit_ablation(s, request, limits=AblationLimits())
                t0_wall, t0 = datetime.now(UTC), time.perf_counter()  # committed: the NOTIFY is out
                query = select(AblationToken.step).where(AblationToken.ablation_id == ablation_id).limit(1)
                with engine.connect() as conn:
                    while conn.execute(query).first() is None:
                        time.sleep(POLL_S)
                        conn.rollback()
                first = time.perf_counter() - t0
                with Session(engine) as s:
                    started = s.get(Job, job_id).started
                if i:
                    out.append(((started - t0_wall).total_seconds(), first))
        finally:
            stop.set()
            worker.join(30)
    engine.dispose()
    return out


def _report_pickups(name: str, rows: list[tuple[float, float]]) -> None:
    claim = sorted(r[0] * 1e3 for r in rows)
    first = sorted(r[1] * 1e3 for r in rows)
    print(f"{name:9s} enqueue→claim  median {statistics.median(claim):7.1f} ms  max {claim[-1]:7.1f} ms   "
          f"enqueue→first token  median {statistics.median(first):7.1f} ms  max {first[-1]:7.1f} ms  (n={len(rows)})")


def pickup_latency(pg_url: str | None, model: AdapterModel, tokenizer, n: int) -> None:
    print(f"== pickup latency: idle worker, {n} submissions each, {IDLE_BEFORE_SUBMIT_S * 1e3:.0f} ms idle before each")
    if pg_url:
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
        name = f"adapterlens_bench_{uuid.uuid4().hex[:8]}"
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:  # no server: say so and go on with SQLite
            print(f"postgres  skipped: cannot create a database at {pg_url}: {type(exc).__name__}: {exc}")
        else:
            try:
                url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
                upgrade(url)
                _report_pickups("postgres", _pickups(url, model, tokenizer, n))
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        upgrade(url)
        _report_pickups("sqlite", _pickups(url, model, tokenizer, n))


# ------------------------------------------------------------------------------------------ throughput


def _timed_steps(steps) -> tuple[float, list[float]]:
    """Run a lockstep iterator; (wall seconds, seconds per step after the prefill step)."""
    t0 = last = time.perf_counter()
    per_step = []
    for _ in steps:
        now = time.perf_counter()
        per_step.append(now - last)
        last = now
    return last - t0, per_step[1:]


def throughput(model: AdapterModel, tokens: int, reps: int) -> None:
    prompt = list(range(5, 45))
    settings = SamplingSettings(max_new_tokens=tokens)
    iv = Intervention.zero([(layer, i) for layer in range(model.n_layers) for i in range(0, model.n_features, 20)])
    per_layer = len(iv.features) // model.n_layers

    def hf() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, []

    runs = {
        "plain": lambda: _timed_steps(lockstep(model, prompt, ablation_tracks([], reference=False, unablated=False),
                                               settings)),
        "hf": hf,
        "intervention": lambda: _timed_steps(lockstep(model, prompt, ablation_tracks([iv], reference=False,
                                                                                     unablated=False), settings)),
        "ablate-job": lambda: _timed_steps(lockstep(model, prompt, ablation_tracks([iv]), settings)),
    }
    for fn in runs.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    steps: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            w, s = fn()
            wall[name].append(w)
            steps[name] += s
    print(f"== generation throughput: {tokens} tokens after a {len(prompt)}-token prompt, greedy, "
          f"{reps} interleaved reps, {len(iv.features)} features zeroed ({per_layer}/layer)")
    print("   wall: median over reps; step: 1 / 20th-percentile time per decoding step (robust to machine load)")
    base_wall = statistics.median(wall["plain"])
    base_step = statistics.quantiles(steps["plain"], n=5)[0]
    for name in runs:
        med = statistics.median(wall[name])
        line = f"{name:13s} wall {tokens / med:8.1f} tok/s ({base_wall / med:4.2f}× plain)"
        if steps[name]:
            p20 = statistics.quantiles(steps[name], n=5)[0]
            line += f"   step {1 / p20:8.1f} tok/s ({base_step / p20:4.2f}× plain)"
        print(line)
    p20 = statistics.quantiles(steps["intervention"], n=5)[0]
    print(f"intervention / plain: {base_step / p20:.3f} by step time, {base_wall / statistics.median(wall['intervention']):.3f} "
          "by wall time; target ≥ 0.9")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default=os.environ.get("ADAPTERLENS_BENCH_PG_URL", DEFAULT_PG),
                        help="a Postgres server URL whose user may create databases ('' to skip)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="organism")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pickups", type=int, default=10, help="submissions timed per backend (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(corpus(0, 60))
    shape = SHAPES[args.shape]
    model = build_model(shape, len(tokenizer))
    print(f"shape {args.shape}: {shape}, vocab {len(tokenizer)}, torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    pg_url = Settings(database_url=args.pg_url).db_url if args.pg_url else None
    if args.pickups > 0:
        pickup_latency(pg_url, model, tokenizer, args.pickups)
    throughput(model, args.tokens, args.reps)


if __name__ == "__main__":
    main()
