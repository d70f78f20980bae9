"""The organism's adapter training step rate alone and beside a competing CPU-bound process, in one run.

A shared machine is the normal case for a CPU worker: the other worker of ``adapterlens up``, the web server,
another program. Each configuration runs in its own process (OpenMP reads its wait policy when torch is
imported), which alternates: steps alone for ``--seconds``, then steps while a busy-loop subprocess
(``while True: pass``) competes for the cores, ``--rounds`` times. Printed per configuration: steps/s alone,
steps/s beside the busy process, and their ratio (issue 17's target: ≥ 0.4 with AdapterLens' settings).

Configurations:

- ``torch-default``: what a bare ``import torch`` gets: one thread per core, spinning OpenMP threads
  (the wait settings removed from the environment);
- ``adapterlens``: training/threads.py's settings (a short spin, ``GOMP_SPINCOUNT=1000``, then sleep; every
  available core unless ``ADAPTERLENS_TORCH_THREADS`` says otherwise), what the worker and ``adapterlens up``'s
  children get;
- ``adapterlens-1``: the same with one thread;
- ``adapterlens-passive``: AdapterLens' thread count with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at
  once: the setting before 2026-12-06);
- ``adapterlens-spin``: AdapterLens' thread count without the passive wait (OpenMP's default: spin a while,
  then sleep), to separate the wait policy's effect from the thread count's;
- ``adapterlens-spin-<N>``: the same with ``GOMP_SPINCOUNT=N`` (spins before an idle thread sleeps).

The step (``--step adapters``, the default): training.step.fused_step of the organism training preset's shape
(Qwen2 4 layers, d 128, MLP 512, 512 features per layer, vocab 384, 32 sequences of 64 tokens) with backward,
clip and AdamW. ``--step build``: a step of the organism build's base phase (the whole model trained on 128
sequences), where the wait policy's cost alone shows most.

    python benchmarks/threads.py                   # ~1 minute
    python benchmarks/threads.py --step build      # the organism build's step instead
    python benchmarks/threads.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.threads import COUNT_VARS, EXPLICIT_WAIT, THREADS_ENV, thread_env  # noqa: E402

BUSY = "while True: pass"


def _configs(threads: int | None) -> dict[str, dict[str, str]]:
    bare = {k: v for k, v in os.environ.items() if k not in EXPLICIT_WAIT and k not in COUNT_VARS and k != THREADS_ENV}
    return {"torch-default": dict(bare, _BENCH_CONFIGURE="0"),
            "adapterlens": dict(thread_env(dict(bare), threads), _BENCH_CONFIGURE="1"),
            "adapterlens-1": dict(thread_env(dict(bare), 1), _BENCH_CONFIGURE="1"),
            "adapterlens-passive": dict(thread_env(dict(bare, OMP_WAIT_POLICY="PASSIVE"), threads), _BENCH_CONFIGURE="1"),
            "adapterlens-spin": dict(thread_env(dict(bare, OMP_WAIT_POLICY="unset"), threads), _BENCH_CONFIGURE="1")}


def _config(name: str, threads: int | None) -> dict[str, str]:
    """A named configuration; ``adapterlens-spin-<N>``: AdapterLens' thread count with OpenMP's default wait
    cut to ``GOMP_SPINCOUNT=N`` spins before a thread sleeps (GNU OpenMP's default is 300,000)."""
    configs = _configs(threads)
    if name in configs:
        return configs[name]
    prefix = "adapterlens-spin-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return dict(configs["adapterlens-spin"], GOMP_SPINCOUNT=name[len(prefix):])
    raise SystemExit(f"unknown configuration {name!r}: choose from {', '.join(configs)} or {prefix}<N>")


def _step_fn(seq: int, batch: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training.adapter import build_adapter_model
    from training.config import preset
    from training.step import fused_step

    cfg = preset("organism")

    def qwen(seed: int) -> Qwen2ForCausalLM:
        c = Qwen2Config(vocab_size=384, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, use_sliding_window=False)
        c._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(c).eval()

    model = build_adapter_model(qwen(1), qwen(2), cfg.adapter)
    params = list(model.adapter_parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 384, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    state = {"k": 0}

    def step() -> None:
        k = state["k"] = (state["k"] + 1) % 5
        res = fused_step(model, ids, mask, weights=cfg.loss, cutoff=k, kl_chunk=cfg.kl_chunk)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _rate(step, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 2:
        step()
        n += 1
    return n / elapsed


def _build_step_fn():
    """One training step of the organism build's base phase (training/organism/build.py): the whole Qwen2 trained,
    128 sequences in 4 length-sorted micro-batches; what a new user waits for first under ``adapterlens up``."""
    import dataclasses

    import torch
    from transformers import Qwen2ForCausalLM

    from training.organism import build
    from training.organism.tasks import FAMILIES, corpus, make_splits
    from training.organism.tokenizer import train_tokenizer

    cfg = build.get_preset("organism")
    tok = train_tokenizer(corpus(0), vocab_size=cfg.vocab_size)
    problems = [p for s in make_splits(0, cfg.n_heldout, FAMILIES).values() for p in s.train]
    enc = build._encode(tok, problems, dict(cfg.family_weights), reasoning=False, solutions=cfg.base_solutions)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(build._model_config(cfg, tok))
    state = {"seed": 0}
    bf16 = build.resolve_precision(cfg.precision) == "bf16"  # as the build runs on this machine

    def step() -> None:
        state["seed"] += 1
        build._train(model, enc, steps=1, lr=1e-4, preset=dataclasses.replace(cfg, warmup_steps=0),
                     seed=state["seed"], pad_id=tok.pad_token_id, desc="bench", progress=False, on_step=None,
                     bf16=bf16)

    return step


def child(seconds: float, rounds: int, seq: int, batch: int, what: str) -> None:
    if os.environ.get("OMP_WAIT_POLICY") == "unset":  # adapterlens-spin: OpenMP loads (import torch) without
        del os.environ["OMP_WAIT_POLICY"]  # a wait policy; configure_torch then sets only the thread count
        os.environ.pop("KMP_BLOCKTIME", None)
        import torch  # noqa: F401
    if os.environ.get("_BENCH_CONFIGURE") == "1":
        from training.threads import configure_torch

        configure_torch()
    import torch

    step = _build_step_fn() if what == "build" else _step_fn(seq, batch)
    for _ in range(3):  # warm-up
        step()
    alone, beside = [], []
    for _ in range(rounds):
        alone.append(_rate(step, seconds))
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(0.2)  # let it get going
            beside.append(_rate(step, seconds))
        finally:
            busy.kill()
            busy.wait()
    print(json.dumps({"threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY")
                      or (f"spin{os.environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in os.environ else "default"),
                      "alone": alone, "beside": beside}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alone/beside pairs per configuration")
    ap.add_argument("--threads", type=int, default=None, help="adapterlens' thread count (default: its choice)")
    ap.add_argument("--configs", nargs="+", default=None, help="subset of: torch-default adapterlens adapterlens-1 adapterlens-passive adapterlens-spin, "
                                                             "or adapterlens-spin-<N> (GOMP_SPINCOUNT=N)")
    ap.add_argument("--step", choices=("adapters", "build"), default="adapters",
                    help="adapters: the adapter training step; build: a step of the organism build (slower per step)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.seconds, args.rounds, args.seq, args.batch, args.step)
        return
    print(f"cores available: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} × ({args.seconds:g} s alone, {args.seconds:g} s beside `python -c '{BUSY}'`); "
          + (f"step: adapter training, organism shape, {args.batch}×{args.seq} tokens" if args.step == "adapters"
             else "step: the organism build's base model, 128 sequences"))
    print(f"{'config':<22}{'threads':>8}{'wait':>11}{'alone steps/s':>15}{'beside steps/s':>16}{'beside/alone':>14}")
    results = {}
    for name in args.configs or list(_configs(args.threads)):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--seconds", str(args.seconds),
               "--rounds", str(args.rounds), "--seq", str(args.seq), "--batch", str(args.batch), "--step", args.step]
        out = subprocess.run(cmd, env=_config(name, args.threads), capture_output=True, text=True, check=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        alone, beside = sum(r["alone"]) / len(r["alone"]), sum(r["beside"]) / len(r["beside"])
        results[name] = (alone, beside)
        print(f"{name:<22}{r['threads']:>8}{r['wait']:>11}{alone:15.2f}{beside:16.2f}{beside / alone:13.2f}×",
              flush=True)
    if "torch-default" in results and "adapterlens" in results:
        d, a = results["torch-default"], results["adapterlens"]
        print(f"adapterlens / torch-default steps/s: alone {a[0] / d[0]:.2f}×, beside the busy process "
              f"{a[1] / d[1]:.2f}×")


if __name__ == "__main__":
    main()
