"""The organism's adapter training step rate alone and beside a competing CPU-bound process, in one run.

A shared machine is the normal case for a CPU worker: the other worker of ``adapterlens up``, the web server,
another program. Each configuration runs in its own process (OpenMP reads its wait policy when torch is
imported), which alternates: steps alone for ``--seconds``, then steps while a busy-loop subprocess
(``while True: pass``) competes for the cores, ``--rounds`` times. Printed per configuration: steps/s alone,
steps/s beside the busy process, and their ratio (issue 17's target: ≥ 0.4 with AdapterLens' settings).

Configurations:

- ``torch-default``: what a bare ``import torch`` gets: one thread per core, spinning OpenMP threads
  (OMP_WAIT_POLICY and KMP_BLOCKTIME removed from the environment);
- ``adapterlens``: training/threads.py's settings (passive wait, every available core unless
  ``ADAPTERLENS_TORCH_THREADS`` says otherwise), what the worker and ``adapterlens up``'s children get;
- ``adapterlens-1``: the same with one thread;
- ``adapterlens-spin``: AdapterLens' thread count without the passive wait (OpenMP's default: spin a while,
  then sleep), to separate the wait policy's effect from the thread count's.

The step: training.step.fused_step of the organism training preset's shape (Qwen2 4 layers, d 128, MLP 512,
512 features per layer, vocab 384, 32 sequences of 64 tokens) with backward, clip and AdamW.

    python benchmarks/threads.py                   # ~1 minute
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

from training.threads import COUNT_VARS, THREADS_ENV, WAIT_ENV, thread_env  # noqa: E402

BUSY = "while True: pass"


def _configs(threads: int | None) -> dict[str, dict[str, str]]:
    bare = {k: v for k, v in os.environ.items() if k not in WAIT_ENV and k not in COUNT_VARS and k != THREADS_ENV}
    return {"torch-default": dict(bare, _BENCH_CONFIGURE="0"),
            "adapterlens": dict(thread_env(dict(bare), threads), _BENCH_CONFIGURE="1"),
            "adapterlens-1": dict(thread_env(dict(bare), 1), _BENCH_CONFIGURE="1"),
            "adapterlens-spin": dict(thread_env(dict(bare, OMP_WAIT_POLICY="unset"), threads), _BENCH_CONFIGURE="1")}


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


def child(seconds: float, rounds: int, seq: int, batch: int) -> None:
    if os.environ.get("OMP_WAIT_POLICY") == "unset":  # adapterlens-spin: OpenMP loads (import torch) without
        del os.environ["OMP_WAIT_POLICY"]  # a wait policy; configure_torch then sets only the thread count
        os.environ.pop("KMP_BLOCKTIME", None)
        import torch  # noqa: F401
    if os.environ.get("_BENCH_CONFIGURE") == "1":
        from training.threads import configure_torch

        configure_torch()
    import torch

    step = _step_fn(seq, batch)
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
    print(json.dumps({"threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY", "unset"),
                      "alone": alone, "beside": beside}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alone/beside pairs per configuration")
    ap.add_argument("--threads", type=int, default=None, help="adapterlens' thread count (default: its choice)")
    ap.add_argument("--configs", nargs="+", default=None, help="subset of: torch-default adapterlens adapterlens-1 adapterlens-spin")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.seconds, args.rounds, args.seq, args.batch)
        return
    print(f"cores available: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} × ({args.seconds:g} s alone, {args.seconds:g} s beside `python -c '{BUSY}'`); "
          f"step: organism shape, {args.batch}×{args.seq} tokens")
    print(f"{'config':<15}{'threads':>8}{'wait':>9}{'alone steps/s':>15}{'beside steps/s':>16}{'beside/alone':>14}")
    configs = _configs(args.threads)
    results = {}
    for name in args.configs or list(configs):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--seconds", str(args.seconds),
               "--rounds", str(args.rounds), "--seq", str(args.seq), "--batch", str(args.batch)]
        out = subprocess.run(cmd, env=configs[name], capture_output=True, text=True, check=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        alone, beside = sum(r["alone"]) / len(r["alone"]), sum(r["beside"]) / len(r["beside"])
        results[name] = (alone, beside)
        print(f"{name:<15}{r['threads']:>8}{r['wait']:>9}{alone:15.2f}{beside:16.2f}{beside / alone:13.2f}×",
              flush=True)
    if "torch-default" in results and "adapterlens" in results:
        d, a = results["torch-default"], results["adapterlens"]
        print(f"adapterlens / torch-default steps/s: alone {a[0] / d[0]:.2f}×, beside the busy process "
              f"{a[1] / d[1]:.2f}×")


if __name__ == "__main__":
    main()
