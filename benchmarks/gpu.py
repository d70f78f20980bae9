"""The GPU figures in one command, with random weights (no download), sized for under 8 minutes on one H100.

Four measurements, each with its baseline from the same run:

1. **train**: one adapter training step (``training.step.fused_step``: KL + NMSE + bridging + L1, backward, clip,
   AdamW) at 7B *layer* shapes (Qwen2.5-7B's d 3584, MLP 18944, 28/4 heads, 152,064-token vocabulary,
   8,192 features per layer, ``--train-layers`` of its 28 layers) with bf16 weights, against a plain
   forward+backward of the target (LM loss, every weight with grad); peak device memory of the step against
   what ``adapterlens plan`` (``training.memory_plan.plan_memory``) estimates for the same shape, tokens and
   checkpointing;
2. **attribute**: one attribution graph (``worker.attribution.attribute``, frozen-mlp) of a 28-layer model
   (Qwen2.5-1.5B's width: d 1536, MLP 8960, 12/2 heads; 8,192 features per layer), against a forward+backward;
3. **collect**: collection tokens/s (``worker.collect.collect``) at two 7B-shaped layers, against the bare
   adapted forward over the same tokens (the paper's density: ~8 of 8,192 features fire per token);
4. **ablate**: tokens/s of the ablate job's lockstep generation (ablated + its reference + unablated, a zero
   ablation of 5% of every layer's features) against Hugging Face ``generate`` of the same model and length.

    python benchmarks/gpu.py                          # CUDA, bf16 (sizes meant for < 8 min on an H100; not run yet)
    python benchmarks/gpu.py --device cpu --tiny      # smoke test of the same code at toy shapes (seconds)
    python benchmarks/gpu.py --only train collect     # a subset

``--json PATH`` also writes every figure. Not run on a GPU yet (no GPU was available where it was written).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars between the figures

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.adapter import AdapterModel, build_adapter_model  # noqa: E402
from training.config import AdapterConfig, LossWeights  # noqa: E402
from training.losses import lm_cross_entropy  # noqa: E402
from training.memory_plan import GB, NAMED_SHAPES, plan_memory  # noqa: E402
from training.step import fused_step  # noqa: E402

SECTIONS = ("train", "attribute", "collect", "ablate")
QWEN7B = {"d": 3584, "mlp": 18944, "heads": 28, "kv": 4, "vocab": 152064, "features": 8192}
QWEN1_5B_28 = {"layers": 28, "d": 1536, "mlp": 8960, "heads": 12, "kv": 2, "vocab": 32768, "features": 8192}
TINY = {"d": 64, "mlp": 128, "heads": 4, "kv": 2, "vocab": 256, "features": 128}


def _qwen(shape: dict, layers: int, seed: int, device: torch.device, dtype: torch.dtype,
          attn: str = "sdpa") -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=shape["mlp"],
                      num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                      max_position_embeddings=32768, tie_word_embeddings=False, use_sliding_window=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built on the device in its dtype: no host or fp32 copy of 7B-shaped weights
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype=dtype).eval()


def _adapter_model(shape: dict, layers: int, device: torch.device, dtype: torch.dtype, *, attn: str = "sdpa",
                   dec_scale: float = 0.02) -> AdapterModel:
    model = build_adapter_model(_qwen(shape, layers, 1, device, dtype, attn), _qwen(shape, layers, 2, device, dtype, attn),
                                AdapterConfig(n_features=shape["features"]))
    g = torch.Generator(device=device).manual_seed(3)
    with torch.no_grad():
        for ad in model.adapters:
            ad.W_dec.normal_(0.0, dec_scale, generator=g)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Peak device bytes allocated while ``fn`` runs (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@torch.no_grad()
def _calibrate(model: AdapterModel, ids: torch.Tensor, per_token: float) -> None:
    """Encoder biases so that about ``per_token`` features of each layer fire per token on ``ids`` [1, n]."""
    for layer in range(model.n_layers):
        with model.capture(layers=[layer]) as caps:
            model(input_ids=ids)
        pre = caps[layer][0][0].float()  # ReLU(W_enc x + b_enc) with the bias as built (zero)
        q = max(0.0, 1.0 - per_token / pre.shape[-1])
        model.adapters[layer].b_enc.sub_(torch.quantile(pre.flatten()[:1 << 20], q).to(pre.dtype))


# ----------------------------------------------------------------------------------------------- train

def bench_train(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    shape = dict(TINY) if args.tiny else dict(QWEN7B)
    layers, seq = args.train_layers, args.train_tokens
    recompute = not args.no_recompute
    plain = _qwen(shape, layers, 0, device, dtype)
    plain.requires_grad_(True)
    ids = torch.randint(3, shape["vocab"], (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)

    def run_plain() -> None:
        loss = lm_cross_entropy(plain(input_ids=ids).logits, ids, mask)
        loss.backward()
        plain.zero_grad(set_to_none=True)

    t_plain = _timed(run_plain, device, args.reps)
    peak_plain = _peak(device, run_plain)
    plain = None  # frees its weights before the adapter model is built
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model = _adapter_model(shape, layers, device, dtype)
    params = list(model.adapter_parameters())
    opt = torch.optim.AdamW(params, lr=8e-4)
    weights, state = LossWeights(), {"k": 0}

    def run_step() -> None:
        k = state["k"] = (state["k"] + 1) % (layers + 1)  # cutoffs cycle over 0..L like the uniform draw
        res = fused_step(model, ids, mask, weights=weights, cutoff=k, kl_chunk=args.kl_chunk, recompute=recompute)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    run_step()  # AdamW's moments exist from here on, as in training
    t_step = _timed(run_step, device, max(args.reps, layers + 1))
    state["k"] = 0  # the next step runs k = 1: the most bridging blocks (the plan's worst case)
    peak_step = _peak(device, run_step)
    plan_shape = replace(NAMED_SHAPES["qwen2.5-7b"], name="bench", n_layers=layers, d_model=shape["d"],
                         d_mlp=shape["mlp"], n_heads=shape["heads"], n_kv_heads=shape["kv"], vocab=shape["vocab"])
    plan = plan_memory(plan_shape, plan_shape, n_features=shape["features"], seq_len=seq, kl_chunk=args.kl_chunk,
                       weight_dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                       precision="bf16" if dtype == torch.bfloat16 else "fp32", recompute=recompute)
    out = {"layers": layers, "tokens": seq, "features": shape["features"], "recompute": recompute,
           "plain_s": t_plain, "step_s": t_step, "step_over_plain": t_step / t_plain,
           "step_tokens_per_s": seq / t_step, "plan_gb": plan.total / GB,
           "peak_step_gb": peak_step / GB if peak_step is not None else None,
           "peak_plain_gb": peak_plain / GB if peak_plain is not None else None}
    if peak_step is not None:
        out["peak_over_plan"] = peak_step / plan.total
    model = opt = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------- attribute

def bench_attribute(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from worker.attribution import attribute

    shape = dict(TINY, layers=3) if args.tiny else dict(QWEN1_5B_28)
    model = _adapter_model(shape, shape["layers"], device, dtype, attn="eager")
    ids = torch.randint(3, shape["vocab"], (args.attr_tokens,), generator=torch.Generator().manual_seed(1)).to(device)
    ids[0] = 1
    _calibrate(model, ids[None], per_token=args.attr_active / (shape["layers"] * args.attr_tokens))
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.hf.get_input_embeddings()

    def fwd_bwd() -> None:
        x = emb(ids[None]).detach().requires_grad_(True)
        model(inputs_embeds=x).logits[0, -1].float().max().backward()

    t_fb = _timed(fwd_bwd, device, args.reps)
    graph = None

    def one_graph() -> None:
        nonlocal graph
        graph = attribute(model, ids, mode="frozen-mlp", max_feature_nodes=args.attr_nodes, progress=False)

    t_graph = _timed(one_graph, device, 1)
    out = {"layers": shape["layers"], "d": shape["d"], "features": shape["features"], "tokens": args.attr_tokens,
           "graph_s": t_graph, "forward_backward_s": t_fb, "graph_over_fb": t_graph / t_fb,
           "active_features": int(graph.active_features.shape[0]), "feature_nodes": int(graph.n_feature_nodes)}
    model = graph = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------- collect

def bench_collect(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from worker.collect import Corpus, Markers, collect
    from worker.collect.runner import _batch_tensors, _batches

    shape = dict(TINY) if args.tiny else dict(QWEN7B, vocab=32768)
    layers = 2
    model = _adapter_model(shape, layers, device, dtype)
    g = torch.Generator().manual_seed(2)
    seq = 64 if args.tiny else 1024
    seqs, total = [], 0
    while total < args.collect_tokens:
        n = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        think = n // 2
        s = ([1] + torch.randint(6, shape["vocab"], (n // 4,), generator=g).tolist() + [3, 4]
             + torch.randint(6, shape["vocab"], (think,), generator=g).tolist() + [5]
             + torch.randint(6, shape["vocab"], (max(0, n - n // 4 - think - 4),), generator=g).tolist())
        seqs.append(s)
        total += len(s)
    corpus = Corpus.from_sequences(seqs, markers=Markers(3, 4, 5))
    _calibrate(model, corpus[0].long().unsqueeze(0).to(device), per_token=8 if not args.tiny else 12)
    kw = {"batch_size": 64, "max_batch_tokens": args.collect_batch_tokens}

    @torch.no_grad()
    def bare() -> None:
        with model.mode("adapted"):
            for rows in _batches(torch.arange(len(corpus)), corpus.lengths, kw["batch_size"], kw["max_batch_tokens"]):
                ids, mask, _ = _batch_tensors(corpus, rows, 0, device)
                model.hf.model(input_ids=ids, attention_mask=mask, use_cache=False)

    t_bare = _timed(bare, device, args.reps)
    t_coll = _timed(lambda: collect(model, corpus, weight_views=False, **kw), device, args.reps)
    n = corpus.n_tokens
    model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"layers": layers, "d": shape["d"], "features": shape["features"], "tokens": n,
            "bare_tokens_per_s": n / t_bare, "collect_tokens_per_s": n / t_coll, "collect_over_bare": t_bare / t_coll}


# ---------------------------------------------------------------------------------------------- ablate

def bench_ablate(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from training.interventions import Intervention
    from worker.ablation.generate import SamplingSettings, ablation_tracks, lockstep

    shape = dict(TINY) if args.tiny else dict(QWEN7B)
    layers = args.ablate_layers
    model = _adapter_model(shape, layers, device, dtype, dec_scale=0.002)
    prompt = list(range(5, 45))
    tokens = args.ablate_tokens
    iv = Intervention.zero([(layer, i) for layer in range(layers) for i in range(0, shape["features"], 20)])
    settings = SamplingSettings(max_new_tokens=tokens)

    @torch.no_grad()
    def hf() -> None:
        model.generate(input_ids=torch.tensor([prompt], device=device), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    def job() -> None:
        for _ in lockstep(model, prompt, ablation_tracks([iv]), settings):
            pass

    t_hf = _timed(hf, device, args.reps)
    t_job = _timed(job, device, args.reps)
    model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"layers": layers, "tokens": tokens, "generate_tokens_per_s": tokens / t_hf,
            "ablate_job_tokens_per_s": tokens / t_job, "ablate_over_generate": t_hf / t_job,
            "streams": 3}


# ------------------------------------------------------------------------------------------------ main

RUNNERS = {"train": bench_train, "attribute": bench_attribute, "collect": bench_collect, "ablate": bench_ablate}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (the smoke test; any device)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 elsewhere")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; 2 with --tiny)")
    ap.add_argument("--train-layers", type=int, default=None, help="7B-shaped blocks in the training step (default 4)")
    ap.add_argument("--train-tokens", type=int, default=None, help="tokens per training step (default 4096)")
    ap.add_argument("--kl-chunk", type=int, default=1024)
    ap.add_argument("--no-recompute", action="store_true", help="the training step without activation checkpointing")
    ap.add_argument("--attr-tokens", type=int, default=None, help="prompt length of the graph (default 128)")
    ap.add_argument("--attr-active", type=int, default=None, help="active features in the graph (default 20000)")
    ap.add_argument("--attr-nodes", type=int, default=None, help="feature-node cap (default 4096)")
    ap.add_argument("--collect-tokens", type=int, default=None, help="collection corpus tokens (default 65536)")
    ap.add_argument("--collect-batch-tokens", type=int, default=None, help="padded tokens per batch (default 16384)")
    ap.add_argument("--ablate-layers", type=int, default=None, help="7B-shaped blocks for generation (default 28)")
    ap.add_argument("--ablate-tokens", type=int, default=None, help="tokens generated (default 128)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    big = {"reps": 5, "train_layers": 4, "train_tokens": 4096, "attr_tokens": 128, "attr_active": 20000,
           "attr_nodes": 4096, "collect_tokens": 65536, "collect_batch_tokens": 16384, "ablate_layers": 28,
           "ablate_tokens": 128}
    tiny = {"reps": 2, "train_layers": 2, "train_tokens": 64, "attr_tokens": 16, "attr_active": 60,
            "attr_nodes": 40, "collect_tokens": 512, "collect_batch_tokens": 256, "ablate_layers": 2,
            "ablate_tokens": 8}
    for key, value in (tiny if args.tiny else big).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --tiny for the smoke test")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {dtype}, torch {torch.__version__}{', tiny shapes (smoke test)' if args.tiny else ''}",
          flush=True)
    results: dict[str, dict] = {"device": {"name": name, "dtype": str(dtype), "tiny": args.tiny}}
    t_all = time.perf_counter()
    for section in args.only:
        t0 = time.perf_counter()
        r = results[section] = RUNNERS[section](args, device, dtype)
        r["section_s"] = time.perf_counter() - t0
        print(_line(section, r), flush=True)
    results["total_s"] = time.perf_counter() - t_all
    print(f"total {results['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def _gb(x: float | None) -> str:
    return "n/a (not CUDA)" if x is None else f"{x:.1f} GB"


def _line(section: str, r: dict) -> str:
    if section == "train":
        peak = f", peak {_gb(r['peak_step_gb'])} vs plan {r['plan_gb']:.1f} GB" + (
            f" ({r['peak_over_plan']:.2f}×)" if "peak_over_plan" in r else "")
        return (f"train: {r['layers']} layers × {r['features']} features, {r['tokens']} tokens, recompute "
                f"{'on' if r['recompute'] else 'off'}: step {r['step_s'] * 1000:.0f} ms = {r['step_over_plain']:.2f}× "
                f"plain forward+backward ({r['plain_s'] * 1000:.0f} ms), {r['step_tokens_per_s']:.0f} tok/s{peak}; "
                f"plain's peak {_gb(r['peak_plain_gb'])} ({r['section_s']:.0f} s)")
    if section == "attribute":
        return (f"attribute: {r['layers']} layers, d {r['d']}, {r['features']} features, {r['tokens']} tokens: "
                f"graph {r['graph_s']:.2f} s = {r['graph_over_fb']:.1f}× forward+backward "
                f"({r['forward_backward_s'] * 1000:.0f} ms); {r['active_features']} active features, "
                f"{r['feature_nodes']} nodes ({r['section_s']:.0f} s)")
    if section == "collect":
        return (f"collect: {r['layers']} layers, d {r['d']}, {r['features']} features, {r['tokens']} tokens: "
                f"{r['collect_tokens_per_s']:.0f} tok/s vs bare forward {r['bare_tokens_per_s']:.0f} tok/s "
                f"→ {r['collect_over_bare']:.2f} ({r['section_s']:.0f} s)")
    return (f"ablate: {r['layers']} layers, {r['tokens']} tokens: ablate job (3 streams) "
            f"{r['ablate_job_tokens_per_s']:.1f} tok/s vs generate {r['generate_tokens_per_s']:.1f} tok/s "
            f"→ {r['ablate_over_generate']:.2f} ({r['section_s']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
