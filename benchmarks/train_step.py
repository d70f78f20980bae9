"""Cost of one adapter training step relative to a plain forward+backward of the target model.

For each shape, three things are timed in one run, interleaved so machine load hits them alike:

- **plain**: the target model alone, every parameter with grad, LM loss, forward + backward;
- **fused**: one full training step of the paper's objective (training.step.fused_step: KL + NMSE at L+1
  points + bridging both ways at a cutoff k + decoder-norm L1), backward, clip, AdamW on the adapters;
- **reference**: the same step computed the straightforward way (training.step.reference_step: separate
  forwards per model and bridging direction, full logits), backward, clip, AdamW;
- **recompute**: the fused step with activation checkpointing (``fused_step(recompute=True)``).

Cutoffs cycle through 0..L so the mean covers the uniform draw. Prints tokens/s of the fused step and the
ratios fused/plain and reference/plain (the prototype measured ~1.7–1.9× fused, ~4× for the paper's code),
then recompute/fused in time and in bytes saved for the backward (distinct non-parameter storages seen by
``saved_tensors_hooks`` during the forward, at the worst cutoff of each; the recompute count includes the
teacher residuals its NMSE checkpoints reference, which are alive anyway).

    python benchmarks/train_step.py                      # CPU, fp32, two shapes
    python benchmarks/train_step.py --device cuda --shapes small 7b-proportions wide --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from training.adapter import build_adapter_model
from training.config import AdapterConfig, LossWeights
from training.losses import lm_cross_entropy
from training.memory_plan import saved_tensor_bytes
from training.step import fused_step, reference_step

SHAPES = {
    "small": {"layers": 4, "d": 128, "mlp": 512, "features": 512, "tokens": 512},
    "7b-proportions": {"layers": 8, "d": 256, "mlp": 1344, "features": 576, "tokens": 1024},
    "wide": {"layers": 8, "d": 256, "mlp": 1024, "features": 2048, "tokens": 1024},
}


def _qwen(shape: dict, vocab: int, seed: int, device: torch.device) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=shape["d"], intermediate_size=shape["mlp"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["d"] // 32,
                      num_key_value_heads=2, max_position_embeddings=max(4096, shape["tokens"]),
                      tie_word_embeddings=False, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_shape(name: str, shape: dict, *, vocab: int, reps: int, device: torch.device, bf16: bool,
                kl_chunk: int, with_reference: bool) -> dict:
    L = shape["layers"]
    plain = _qwen(shape, vocab, 0, device)
    plain.requires_grad_(True)
    model = build_adapter_model(_qwen(shape, vocab, 1, device), _qwen(shape, vocab, 2, device),
                                AdapterConfig(n_features=shape["features"]))
    params = list(model.adapter_parameters())
    opt = torch.optim.AdamW(params, lr=8e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, shape["tokens"]), generator=g).to(device)
    mask = torch.ones_like(ids)
    weights = LossWeights()

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def run_plain(_k: int) -> None:
        with autocast():
            loss = lm_cross_entropy(plain(input_ids=ids).logits, ids, mask)
        loss.backward()
        plain.zero_grad(set_to_none=True)

    def run_step(fn, k: int, **kw) -> None:
        with autocast():
            res = fn(model, ids, mask, weights=weights, cutoff=k, **kw)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    runs = {"plain": run_plain, "fused": lambda k: run_step(fused_step, k, kl_chunk=kl_chunk),
            "recompute": lambda k: run_step(fused_step, k, kl_chunk=kl_chunk, recompute=True)}
    if with_reference:
        runs["reference"] = lambda k: run_step(reference_step, k)
    times: dict[str, list[float]] = {key: [] for key in runs}
    for fn in runs.values():  # warm-up: allocator, kernels, first-call overheads
        fn(0)
        fn(L // 2)
    for rep in range(reps):
        k = rep % (L + 1)
        for key, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(k)
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    out = {"shape": name, **shape, "vocab": vocab}
    for key, ts in times.items():
        out[f"{key}_ms"] = 1000 * statistics.mean(ts)
        out[f"{key}_median_ms"] = 1000 * statistics.median(ts)
    out["fused_tokens_per_s"] = shape["tokens"] / (out["fused_ms"] / 1000)
    out["fused_ratio"] = out["fused_ms"] / out["plain_ms"]
    if with_reference:
        out["reference_ratio"] = out["reference_ms"] / out["plain_ms"]
    out["recompute_time_ratio"] = out["recompute_ms"] / out["fused_ms"]

    def forward(k: int, recompute: bool):
        with autocast():
            return fused_step(model, ids, mask, weights=weights, cutoff=k, kl_chunk=kl_chunk, recompute=recompute)

    saved = {rc: max(_saved_bytes(model, lambda k=k, rc=rc: forward(k, rc)) for k in range(L + 1))
             for rc in (False, True)}
    out["fused_saved_mb"], out["recompute_saved_mb"] = saved[False] / 1e6, saved[True] / 1e6
    out["recompute_saved_ratio"] = saved[True] / saved[False]
    return out


def _saved_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the distinct non-parameter storages one forward saves for its backward (then run, unmeasured)."""
    res, n_bytes = saved_tensor_bytes(model, forward)
    res.loss.backward()
    model.zero_grad(set_to_none=True)
    return n_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["small", "7b-proportions"], choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=0, help="timed steps per kind (default: 2 sweeps over k = 0..L)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for all three (default fp32)")
    ap.add_argument("--kl-chunk", type=int, default=1024)
    ap.add_argument("--no-reference", action="store_true", help="skip the straightforward implementation")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"vocab {args.vocab}, torch {torch.__version__}")
    print(f"{'shape':<16}{'L':>3}{'d':>5}{'mlp':>6}{'F':>6}{'tok':>6} {'plain ms':>9} {'fused ms':>9} "
          f"{'ref ms':>9} {'fused/plain':>12} {'ref/plain':>10} {'fused tok/s':>12} {'rc ms':>9} "
          f"{'rc/fused time':>14} {'rc/fused saved':>15}")
    for name in args.shapes:
        shape = SHAPES[name]
        reps = args.reps or 2 * (shape["layers"] + 1)
        r = bench_shape(name, shape, vocab=args.vocab, reps=reps, device=device, bf16=args.bf16,
                        kl_chunk=args.kl_chunk, with_reference=not args.no_reference)
        ref_ms = f"{r['reference_ms']:9.1f}" if "reference_ms" in r else f"{'-':>9}"
        ref_ratio = f"{r['reference_ratio']:9.2f}×" if "reference_ratio" in r else f"{'-':>10}"
        print(f"{name:<16}{r['layers']:>3}{r['d']:>5}{r['mlp']:>6}{r['features']:>6}{r['tokens']:>6} "
              f"{r['plain_ms']:9.1f} {r['fused_ms']:9.1f} {ref_ms} {r['fused_ratio']:11.2f}× {ref_ratio} "
              f"{r['fused_tokens_per_s']:12.0f} {r['recompute_ms']:9.1f} {r['recompute_time_ratio']:13.2f}× "
              f"{r['recompute_saved_ratio']:14.2f}× ({r['recompute_saved_mb']:.0f} of {r['fused_saved_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
