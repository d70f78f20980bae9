"""The diff lens against three plain forwards of the same models, on one text, in one run.

On the same token ids (interleaved repetitions, so machine load hits both alike):

- **plain**: three forwards with logits, no captures: target, hybrid and adapted mode of the adapter model;
- **lens**: ``worker.lens.diff.diff_lens`` (the same three forwards plus activation capture, KL, top tokens,
  every active feature's direct effect, per-position ranking and the per-text table) and its JSON-ready form,
  i.e. everything the ``lens`` job computes before writing the row (the JSON encoding of the row, done by the
  store, is timed and printed apart).

Prints the median (and best) time of both and the ratio lens / plain (target ≤ 1.5). Times are the process's
CPU time (``time.process_time``; with ``--threads 1`` the work itself, whatever else the machine runs); on a GPU
(``--device cuda``) wall-clock time after a synchronize. Random weights of the organism's
shape; adapter encoder biases are calibrated so that about ``--density`` of (token, feature) pairs fire (the
organism's trained adapters: 70–100 of 512 per layer).

    python benchmarks/lens.py --threads 1                  # CPU, organism shape, 384 tokens
    python benchmarks/lens.py --shape wide --tokens 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from training.adapter import AdapterModel, build_adapter_model
from training.config import AdapterConfig
from worker.lens.diff import diff_lens

SHAPES = {
    "organism": {"layers": 4, "d": 128, "mlp": 512, "features": 512, "vocab": 512},
    "wide": {"layers": 8, "d": 512, "mlp": 2048, "features": 8192, "vocab": 8192},
}


def _qwen(shape: dict, seed: int, device: torch.device) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=shape["mlp"],
                      num_hidden_layers=shape["layers"], num_attention_heads=max(1, shape["d"] // 64),
                      num_key_value_heads=max(1, shape["d"] // 256), max_position_embeddings=8192,
                      tie_word_embeddings=False, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device).eval()


@torch.no_grad()
def _calibrate(model: AdapterModel, ids: torch.Tensor, density: float, seed: int) -> None:
    """Random decoders; encoder biases set layer by layer so that ~density of pairs fire on ``ids``."""
    g = torch.Generator().manual_seed(seed)
    for layer, ad in enumerate(model.adapters):
        ad.W_dec.copy_((torch.randn(ad.W_dec.shape, generator=g) * 0.02).to(ad.W_dec.device))
        x = {}
        h = model.layers[layer].post_attention_layernorm.register_forward_hook(lambda m, a, o, x=x: x.setdefault("x", o))
        model.hf.model(input_ids=ids, use_cache=False)
        h.remove()
        pre = (x["x"].reshape(-1, x["x"].shape[-1]) @ ad.W_enc.T).float()
        ad.b_enc.copy_(-torch.quantile(pre, 1 - density, dim=0))


@torch.no_grad()
def _plain(model: AdapterModel, ids: torch.Tensor) -> None:
    for mode in ("target", "hybrid", "adapted"):
        with model.mode(mode):
            model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device: torch.device) -> float:
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="organism")
    p.add_argument("--tokens", type=int, default=384, help="length of the text in tokens")
    p.add_argument("--density", type=float, default=0.15, help="fraction of (token, feature) pairs that fire")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    base, target = _qwen(shape, 0, device), _qwen(shape, 1, device)
    model = build_adapter_model(base, target, AdapterConfig(n_features=shape["features"]))
    ids = torch.randint(3, shape["vocab"], (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    _calibrate(model, ids, args.density, 0)

    plain, lens, dumps = [], [], []
    _plain(model, ids)  # warm-up of both
    result = diff_lens(model, ids[0].tolist())
    for _ in range(args.reps):
        _sync(device)
        t0 = _clock(device)
        _plain(model, ids)
        _sync(device)
        t1 = _clock(device)
        result = diff_lens(model, ids[0].tolist())
        stored = result.to_json()
        _sync(device)
        t2 = _clock(device)
        size = len(json.dumps(stored))  # the store's JSON encoding: timed apart (part of writing the row)
        t3 = _clock(device)
        plain.append(t1 - t0)
        lens.append(t2 - t1)
        dumps.append(t3 - t2)
    a, b = statistics.median(plain), statistics.median(lens)
    best_a, best_b = min(plain), min(lens)
    active = statistics.fmean(result.n_active)
    print(f"shape {args.shape} on {device}, {args.threads} thread(s): {shape['layers']} layers × {shape['features']} "
          f"features, d {shape['d']}, vocab {shape['vocab']}; text of {args.tokens} tokens, "
          f"{active:.0f} active features per token, {len(result.table)} fire on the text")
    print(f"  CPU time, median of {args.reps}: three plain forwards {1000 * a:7.1f} ms · lens {1000 * b:7.1f} ms "
          f"(best: {1000 * best_a:.1f} ms · {1000 * best_b:.1f} ms)")
    print(f"  result JSON {size / 1e6:.2f} MB, encoded in {1000 * statistics.median(dumps):.1f} ms when stored")
    print(f"  ratio lens / plain: {b / a:.2f} median, {best_b / best_a:.2f} best (target ≤ 1.5)")


if __name__ == "__main__":
    main()
