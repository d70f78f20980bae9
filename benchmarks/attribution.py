"""Seconds per attribution graph, and the ratio to one forward+backward of the same adapter model.

Shape as in /work/shared/attribution-notes.md: Qwen2, 8 layers, d_model 256, intermediate 1024, 4/2 heads,
vocab 2048, 2,048 adapter features per layer, 128 tokens; encoder biases are calibrated so that about
``--active`` features fire on the prompt (the notes' prototype had ~1,440). Random weights: the speed of
the engine does not depend on what the weights mean.

    python benchmarks/attribution.py --seq 128 --max-feature-nodes 1000 --threads 1

Prints, per mode: seconds per graph, the backward chunks (target batches) used, and the ratio to a plain
forward+backward (gradients to the input embeddings) timed in the same run; wall-clock and process CPU
time both (on a shared machine the CPU-time ratio is the steadier one; with one thread they agree).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from training.adapter import AdapterModel, build_adapter_model
from training.config import AdapterConfig
from worker.attribution import attribute


def build(args: argparse.Namespace) -> AdapterModel:
    def one(seed: int) -> Qwen2ForCausalLM:
        cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.intermediate,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 256),
                          tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.05,
                          bos_token_id=1, eos_token_id=2)
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg).eval()

    model = build_adapter_model(one(0), one(1), AdapterConfig(n_features=args.features))
    with torch.no_grad():
        for ad in model.adapters:
            ad.W_dec.normal_(0.0, 0.02)
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    return model


@torch.no_grad()
def calibrate(model: AdapterModel, ids: torch.Tensor, n_active: int) -> None:
    """Set each layer's b_enc to one threshold so that about ``n_active`` features fire in all (as in training)."""
    per_layer = max(n_active // model.n_layers, 1)
    for layer in range(model.n_layers):
        with model.capture(layers=[layer]) as caps:
            model(ids[None])
        pre = caps[layer][0][0]  # ReLU(W_enc x) with b_enc = 0 so far
        ad = model.adapters[layer]
        thresh = pre.flatten().topk(per_layer + 1).values[-1]
        ad.b_enc.fill_(-float(thresh))


def forward_backward_seconds(model: AdapterModel, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    """One plain forward+backward with gradients to the input embeddings: (wall, CPU) seconds, best of runs."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb_layer = model.hf.get_input_embeddings()
    wall, cpu = [], []
    for _ in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        emb = emb_layer(ids[None]).detach().requires_grad_(True)
        out = model(inputs_embeds=emb).logits[0, -1]
        out.max().backward()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall[1:]), min(cpu[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--max-feature-nodes", type=int, default=1000)
    ap.add_argument("--active", type=int, default=1440, help="features firing on the prompt (approx.)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--round-size", type=int, default=1024)
    ap.add_argument("--modes", nargs="+", default=["frozen-mlp", "relp"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float64"],
                    help="attribution compute dtype (default: the model's, float32)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args).to(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.seq,), generator=g).to(args.device)
    ids[0] = 1  # BOS
    calibrate(model, ids, args.active)
    fb, fb_cpu = forward_backward_seconds(model, ids, args.repeats + 2)
    print(f"shape: {args.layers} layers, d {args.d_model}, mlp {args.intermediate}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}, {args.features} features/layer, {args.seq} tokens, {args.threads} thread(s), "
          f"device {args.device}, compute dtype {args.dtype or 'float32'}")
    print(f"forward+backward (grad to input embeddings): {fb * 1000:.1f} ms wall, {fb_cpu * 1000:.1f} ms CPU")
    for mode in args.modes:
        times, cpus, fbs, fb_cpus, graph = [], [], [], [], None
        for _ in range(args.repeats):
            # the baseline again beside every graph: a shared machine's speed drifts by 10-20% within minutes
            w, c = forward_backward_seconds(model, ids, 2)
            fbs.append(w)
            fb_cpus.append(c)
            t0, c0 = time.perf_counter(), time.process_time()
            graph = attribute(model, ids, mode=mode, max_feature_nodes=args.max_feature_nodes,
                              batch_size=args.batch_size, round_size=args.round_size, progress=False,
                              dtype=getattr(torch, args.dtype) if args.dtype else None)
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        sec, cpu, base, base_cpu = min(times), min(cpus), min(fbs), min(fb_cpus)
        n_active = int(graph.active_features.shape[0])
        print(f"{mode:>10}: {sec:.2f} s/graph wall ({sec / base:.1f}x forward+backward of {base * 1000:.0f} ms beside it), "
              f"{cpu:.2f} s CPU ({cpu / base_cpu:.1f}x); {n_active} active features, "
              f"{graph.n_feature_nodes} feature nodes + {graph.n_logits} logits, "
              f"{graph.settings['backward_chunks']} backward chunks of <= {args.batch_size} targets, "
              f"{graph.settings['rounds']} influence round(s)")

if __name__ == "__main__":
    main()
