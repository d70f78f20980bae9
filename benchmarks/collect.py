"""Feature collection throughput against a bare forward pass, and the cost of storing the result.

In one run, on the same batches of the same tokens (interleaved, so machine load hits both alike):

- **bare**: the adapter model's decoder forward in ``adapted`` mode (no LM head, as collection runs it);
- **collect**: ``worker.collect.collect`` over the same corpus (the pass only: logit lens and neighbours,
  which depend on weights alone, are timed separately).

Prints tokens/s of both and the ratio collect/bare (target ≥ 0.7). Adapter encoder biases are calibrated
so that about ``--density`` of (token, feature) pairs fire, per layer (a trained adapter: L0 / F). Defaults: the
trained organism's per-layer L0 (107.6, 31.8, 21.7, 17.5 of 512: README, *The organism*) for ``organism``, the
paper's 8 of 8192 (0.001) for ``7b-layer``; ``--density 0.15`` is the uniform figure earlier runs used.

Then the store: a complete organism-sized result (4 layers × 512 features, 20 top + 10 random examples
each, and the corpus sequences they come from, as the collect job writes them) written to a fresh SQLite file, and to Postgres when ``--pg-url`` names a database it may migrate
(the run it creates is deleted again).

    python benchmarks/collect.py --threads 1             # CPU, organism shape (~1 min)
    python benchmarks/collect.py --shape 7b-layer --skip-store   # two 7B-shaped layers, 1,024 tokens (5-10 min)
    python benchmarks/collect.py --shape wide --device cuda --dtype bf16 --density 0.002 --tokens 262144
    python benchmarks/collect.py --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars between the figures

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from training.adapter import AdapterModel, build_adapter_model  # noqa: E402
from training.config import AdapterConfig  # noqa: E402
from worker.collect import Corpus, Markers, collect, write_collection  # noqa: E402
from worker.collect.runner import _batch_tensors, _batches  # noqa: E402

SHAPES = {  # "tokens": the default corpus size (enough batches for steady state, minutes on one CPU thread)
    "organism": {"layers": 4, "d": 128, "mlp": 512, "features": 512, "vocab": 512, "seq": 60, "tokens": 98304,
                 "density": [107.6 / 512, 31.8 / 512, 21.7 / 512, 17.5 / 512]},
    "wide": {"layers": 8, "d": 512, "mlp": 2048, "features": 8192, "vocab": 8192, "seq": 512, "tokens": 32768,
             "density": [0.002]},
    # ~1.3 GFLOP a token: ~50 tok/s on one CPU thread; 1,024 tokens and the weight views (~1.5 min) take 5-10 min
    # on a shared 2-core machine (98,304 tokens would take hours)
    "7b-layer": {"layers": 2, "d": 3584, "mlp": 18944, "features": 8192, "vocab": 32768, "seq": 1024, "tokens": 1024,
                 "density": [0.001]},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _qwen(shape: dict, seed: int, device: torch.device, dtype: torch.dtype) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=shape["mlp"],
                      num_hidden_layers=shape["layers"], num_attention_heads=max(1, shape["d"] // 64),
                      num_key_value_heads=max(1, shape["d"] // 256), max_position_embeddings=8192,
                      tie_word_embeddings=False, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def _calibrate(model: AdapterModel, ids: torch.Tensor, density: list[float], seed: int) -> None:
    """Random decoders; encoder biases set layer by layer so that ~density[layer] of pairs fire on ``ids``
    (one value: every layer)."""
    g = torch.Generator().manual_seed(seed)
    for layer, ad in enumerate(model.adapters):
        ad.W_dec.copy_(torch.randn(ad.W_dec.shape, generator=g) * 0.02)
        x = {}
        h = model.layers[layer].post_attention_layernorm.register_forward_hook(lambda m, a, o, x=x: x.setdefault("x", o))
        model.hf.model(input_ids=ids, use_cache=False)
        h.remove()
        pre = (x["x"].reshape(-1, x["x"].shape[-1]) @ ad.W_enc.T).float()
        d = density[layer] if len(density) > 1 else density[0]
        ad.b_enc.copy_(-torch.quantile(pre[: 4096], 1 - d, dim=0))


def _corpus(shape: dict, n_tokens: int, seed: int) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    seqs, total = [], 0
    while total < n_tokens:
        n = int(torch.randint(shape["seq"] // 2, shape["seq"] + 1, (1,), generator=g))
        think = n // 2
        seq = ([1] + torch.randint(6, shape["vocab"], (n // 4,), generator=g).tolist() + [3, 4]
               + torch.randint(6, shape["vocab"], (think,), generator=g).tolist() + [5]
               + torch.randint(6, shape["vocab"], (n - n // 4 - think - 4,), generator=g).tolist())
        seqs.append(seq)
        total += len(seq)
    return Corpus.from_sequences(seqs, markers=Markers(3, 4, 5))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Wall time and this process's CPU time (steadier than wall time on a shared machine)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> _Clock:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.no_grad()
def _bare(model: AdapterModel, corpus: Corpus, batch_size: int, max_tokens: int, device: torch.device) -> _Clock:
    batches = _batches(torch.arange(len(corpus)), corpus.lengths, batch_size, max_tokens)
    with model.mode("adapted"), _Clock(device) as clock:
        for rows in batches:
            ids, mask, _ = _batch_tensors(corpus, rows, 0, device)
            model.hf.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return clock


def bench_pass(shape: dict, args: argparse.Namespace, device: torch.device) -> None:
    dtype = DTYPES[args.dtype]
    model = build_adapter_model(_qwen(shape, 0, device, dtype), _qwen(shape, 1, device, dtype),
                                AdapterConfig(n_features=shape["features"]))
    corpus = _corpus(shape, args.tokens, 0)
    _calibrate(model, corpus[0].long().unsqueeze(0).to(device) if corpus.lengths[0] > 64 else
               torch.cat([corpus[i] for i in range(8)]).long().unsqueeze(0).to(device), args.density, 0)
    kw = {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens}
    _bare(model, corpus, device=device, batch_size=args.batch_size, max_tokens=args.max_batch_tokens)  # warm-up
    bare, coll = [], []
    for _ in range(args.reps):
        bare.append(_bare(model, corpus, args.batch_size, args.max_batch_tokens, device))
        with _Clock(device) as clock:
            result = collect(model, corpus, weight_views=False, **kw)
        coll.append(clock)
    t = time.perf_counter()
    collect(model, Corpus.from_sequences([corpus[0].tolist()]), weight_views=True, **kw)
    views = time.perf_counter() - t - min(c.wall for c in coll) * corpus.lengths[0].item() / corpus.n_tokens
    n = corpus.n_tokens
    dens = [float(s.count.sum()) / (n * shape["features"]) for s in result.stats.values()]
    print(f"shape {args.shape} on {device} ({args.dtype}): {shape['layers']} layers × {shape['features']} features, "
          f"{n} tokens in {len(corpus)} sequences, density per layer {' '.join(f'{x:.4f}' for x in dens)}")
    for what, get in (("wall", lambda c: c.wall), ("process CPU", lambda c: c.cpu)):
        b, c = statistics.median(map(get, bare)), statistics.median(map(get, coll))
        print(f"  {what} time (median of {args.reps}): bare forward {n / b:8.0f} tok/s, collect pass {n / c:8.0f} tok/s"
              f" → ratio {b / c:.2f} (target >= 0.8)")
    print("  (the collect pass includes moving the results to the CPU and cutting token windows)")
    print(f"  logit lens + neighbours (weights only): {views:.2f} s")


def bench_store(args: argparse.Namespace) -> None:
    from sqlalchemy.orm import Session

    from app.db.migrate import upgrade
    from app.db.schema import Run
    from app.db.session import make_engine

    shape = SHAPES["organism"]
    torch.manual_seed(0)
    model = build_adapter_model(_qwen(shape, 0, torch.device("cpu"), torch.float32),
                                _qwen(shape, 1, torch.device("cpu"), torch.float32), AdapterConfig(n_features=512))
    corpus = _corpus(shape, 16384, 1)
    _calibrate(model, torch.cat([corpus[i] for i in range(8)]).long().unsqueeze(0), shape["density"], 0)
    result = collect(model, corpus, top_k=20, n_random=10, n_neighbours=10)
    n_ex = sum(int((s.top.loc >= 0).sum() + (s.random.loc >= 0).sum()) for s in result.stats.values())
    print(f"store: {len(result.layers)} layers × 512 features, {n_ex} examples "
          f"({n_ex / (len(result.layers) * 512):.1f} per feature)")
    urls = []
    tmp = tempfile.TemporaryDirectory()
    urls.append(("sqlite", f"sqlite:///{Path(tmp.name) / 'bench.db'}"))
    if args.pg_url:
        urls.append(("postgres", args.pg_url))
    for name, url in urls:
        upgrade(url)
        engine = make_engine(url)
        with Session(engine) as session, session.begin():
            run = Run(name=f"bench-collect-{time.time_ns()}", base_model="b", target_model="t")
            session.add(run)
            session.flush()
            run_id = run.id
        times = []
        for _ in range(2):  # the second write replaces the first (delete + insert in one transaction)
            t = time.perf_counter()
            write_collection(engine, run_id, result, corpus=corpus)  # with its source sequences, as the job
            times.append(time.perf_counter() - t)
        print(f"  {name:8s}: first write {times[0]:.2f} s, rewrite {times[1]:.2f} s")
        with Session(engine) as session, session.begin():
            session.delete(session.get(Run, run_id))
        engine.dispose()
    tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="organism")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokens", type=int, default=None, help="corpus size in tokens (default: the shape's)")
    p.add_argument("--density", type=float, nargs="+", default=None,
                   help="fraction of (token, feature) pairs that fire: one value, or one per layer (default: the shape's)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch (collect's default)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per batch (collect's default)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--pg-url", default=None, help="also time the store on this Postgres database (migrated here)")
    p.add_argument("--skip-store", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.tokens = args.tokens or SHAPES[args.shape]["tokens"]
    args.density = args.density or SHAPES[args.shape]["density"]
    if len(args.density) not in (1, SHAPES[args.shape]["layers"]):
        p.error(f"--density: one value or one per layer ({SHAPES[args.shape]['layers']})")
    bench_pass(SHAPES[args.shape], args, device)
    if not args.skip_store:
        bench_store(args)


if __name__ == "__main__":
    main()
