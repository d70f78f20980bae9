"""Feature collection: one streaming pass of the adapter model over a corpus (issue 3, ``collect``).

Steps (timings of each are logged):

1. Pick this shard's sequences (every n-th from i) and batch them longest first, within a row and a
   padded-token budget (right padding, masked out of every statistic).
2. Run the adapter model's decoder (no LM head: collection needs no logits) in ``adapted`` mode under
   ``capture``. A forward hook on each layer's MLP hands that layer's activations f [rows, seq, F] to
   its :class:`~worker.collect.stats.FeatureStats` at once and drops them, so only one layer's f is
   alive at a time.
3. Move the accumulators to the CPU and cut the kept examples' token windows from the corpus.
4. Logit lens and decoder neighbours (weights only; by default computed by shard 0 or a whole pass).

Memory: on the device, one layer's f plus the per-layer buffers ``F × (top_k + n_random) × window``
activations (28 layers × 8192 features × 30 × 71 bf16 ≈ 1 GB at the paper's size), whatever the
corpus size; on the CPU the corpus (5 bytes a token) and the same buffers with token ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from training.adapter import AdapterModel
from training.chat import REGION_NAMES, Region
from worker.collect.corpus import Corpus
from worker.collect.lens import decoder_neighbours, logit_lens
from worker.collect.result import CollectionResult
from worker.collect.stats import (
    N_THINK_BINS,
    POS_BITS,
    BatchInfo,
    FeatureStats,
    hist_edges_for_display,
    pack_loc,
    quantile_band_edges,
    unpack_loc,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
PROGRESS_INTERVAL = 2.0  # seconds between progress callbacks (each may write a job row)


def collect(model: AdapterModel, corpus: Corpus | Sequence[Sequence[int]], *, top_k: int = 20, n_random: int = 10,
            n_quantile: int = 2, ctx_before: int = 50, ctx_after: int = 20, batch_size: int = 64, max_batch_tokens: int = 16384,
            shard: tuple[int, int] | None = None, seed: int = 0, progress: Progress | None = None,
            layers: Sequence[int] | None = None, lens_tokens: int = 10, n_neighbours: int = 10,
            weight_views: bool | None = None, token_mask: torch.Tensor | None = None,
            hesitation_ids: Sequence[int] | None = None) -> CollectionResult:
    """Gather every feature's dashboard statistics in one pass; see the module docstring.

    ``corpus``: a :class:`Corpus` (token ids with regions) or plain token-id lists (all regions PROMPT).
    ``shard=(i, n)``: only sequences i, i+n, i+2n, …; merge the n results with ``merge_results``.
    ``batch_size`` rows and at most ``max_batch_tokens`` padded tokens per forward (a longer sequence
    runs alone; the statistics' update has a cost per batch as well as per entry, so short sequences want many
    rows: 64 rows collected the organism's shape 2–14% faster than 16 in `benchmarks/collect.py`).
    ``weight_views``: compute logit lens and neighbours (default: unless a shard other than 0).
    ``progress(done, total, message)`` is called every few seconds with sequences done; it may raise (e.g. a
    job's cancellation check) to stop the pass, leaving the model as it was. Activations are those of the
    model as set: interventions active on it apply. ``token_mask``: the vocabulary ids that are tokens (the
    logit lens never lists padded ids). ``hesitation_ids``: the hesitation tokens whose largest logit-lens
    value each feature keeps (its hesitation lens).
    """
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.from_sequences(corpus)
    layers = _check_args(model, corpus, top_k=top_k, n_random=n_random, n_quantile=n_quantile, ctx_before=ctx_before,
                         ctx_after=ctx_after, batch_size=batch_size, max_batch_tokens=max_batch_tokens, shard=shard,
                         layers=layers)
    shard = shard or (0, 1)
    device = next(model.parameters()).device
    act_dtype = model.adapters[0].W_enc.dtype
    stats = {layer: FeatureStats.empty(layer, model.n_features, top_k=top_k, n_random=n_random, n_quantile=n_quantile,
                                       ctx_before=ctx_before,
                                       ctx_after=ctx_after, seed=seed, act_dtype=act_dtype, device=device)
             for layer in layers}
    for s in stats.values():
        s.shards = [shard]

    t0 = time.perf_counter()
    ids = torch.arange(len(corpus))[shard[0]::shard[1]]
    ids = ids[corpus.lengths[ids] > 0]
    batches = _batches(ids, corpus.lengths, batch_size, max_batch_tokens)
    n_tokens = int(corpus.lengths[ids].sum())
    logger.info("collect: shard %d/%d, %d sequences, %d tokens, %d batches, layers %s",
                shard[0], shard[1], len(ids), n_tokens, len(batches), layers)
    _run_pass(model, corpus, batches, stats, device, n_tokens, progress, len(ids))
    t1 = time.perf_counter()

    cpu = {layer: s.to("cpu").sort_examples() for layer, s in stats.items()}
    for s in cpu.values():
        s.fill_tokens(lambda loc, s=s: corpus.windows(*unpack_loc(loc), s.ctx_before, s.ctx_after))
    t2 = time.perf_counter()
    if weight_views is None:
        weight_views = shard[0] == 0
    lens = logit_lens(model, n=lens_tokens, layers=list(layers), token_mask=token_mask,
                      hesitation_ids=hesitation_ids) if weight_views else None
    neighbours = decoder_neighbours(model, n=n_neighbours, layers=list(layers)) if weight_views else None
    t3 = time.perf_counter()
    logger.info("collect: pass %.1f s (%.0f tok/s), token windows %.1f s, lens + neighbours %.1f s",
                t1 - t0, n_tokens / max(t1 - t0, 1e-9), t2 - t1, t3 - t2)
    meta = {
        "top_k": top_k, "n_random": n_random, "n_quantile": n_quantile, "quantile_edges": quantile_band_edges(),
        "ctx_before": ctx_before, "ctx_after": ctx_after, "seed": seed,
        "hist_edges": hist_edges_for_display(), "regions": list(REGION_NAMES),
        "think_pos_edges": [i / N_THINK_BINS for i in range(N_THINK_BINS + 1)],
        "lens": "W_U (g * W_dec[:, i]), demeaned over the vocabulary; g = final RMSNorm gain, no 1/rms",
    }
    return CollectionResult(cpu, lens, neighbours, n_sequences=len(ids), meta=meta)


def _check_args(model: AdapterModel, corpus: Corpus, *, top_k: int, n_random: int, n_quantile: int, ctx_before: int,
                ctx_after: int,
                batch_size: int, max_batch_tokens: int, shard: tuple[int, int] | None,
                layers: Sequence[int] | None) -> list[int]:
    for name, value in (("top_k", top_k), ("n_random", n_random), ("ctx_before", ctx_before), ("ctx_after", ctx_after),
                        ("n_quantile", n_quantile)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
    if shard is not None:
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    layers = list(range(model.n_layers)) if layers is None else sorted(set(layers))
    bad = [x for x in layers if not 0 <= x < model.n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty subset of 0..{model.n_layers - 1}, got {bad or layers}")
    vocab = model.hf.get_input_embeddings().num_embeddings
    if corpus.n_tokens and int(corpus.tokens.max()) >= vocab:
        raise ValueError(f"corpus has token id {int(corpus.tokens.max())}, outside the model's vocabulary of {vocab}")
    if corpus.n_tokens and int(corpus.lengths.max()) >= 1 << POS_BITS:
        raise ValueError(f"a sequence of {int(corpus.lengths.max())} tokens is too long (limit {1 << POS_BITS})")
    return layers


def _batches(ids: torch.Tensor, lengths: torch.Tensor, batch_size: int, max_tokens: int) -> list[torch.Tensor]:
    """Longest first (ties by id, so batching is deterministic), up to ``batch_size`` rows and ``max_tokens``."""
    lens = lengths[ids]
    order = torch.argsort(lens, descending=True, stable=True)
    ids, lens = ids[order].tolist(), lens[order].tolist()
    out, cur, width = [], [], 0
    for i, n in zip(ids, lens, strict=True):
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * width > max_tokens):
            out.append(torch.tensor(cur))
            cur = []
        if not cur:
            width = n
        cur.append(i)
    if cur:
        out.append(torch.tensor(cur))
    return out


def think_bins(region: torch.Tensor, n_bins: int = N_THINK_BINS) -> torch.Tensor:
    """Relative-position bin inside each thinking span, per token of ``region`` [rows, seq]; -1 elsewhere.

    Same positions as ``training.chat.thinking_positions`` (k-th of a span of n: p = k / max(n - 1, 1)),
    binned exactly in integers: bin = min(floor(n_bins · p), n_bins - 1).
    """
    is_t = region == int(Region.THINKING)
    prev = torch.zeros_like(is_t)
    prev[:, 1:] = is_t[:, :-1]
    starts = (is_t & ~prev).reshape(-1)
    flat_t = is_t.reshape(-1)
    span = torch.cumsum(starts.long(), 0) - 1  # span id of each token (valid where thinking)
    idx = torch.arange(flat_t.numel(), device=region.device)
    start_pos = idx[starts]
    span_len = torch.bincount(span[flat_t], minlength=start_pos.numel())
    out = torch.full_like(idx, -1)
    sp = span[flat_t]
    rel = idx[flat_t] - start_pos[sp]
    out[flat_t] = ((rel * n_bins) // (span_len[sp] - 1).clamp(min=1)).clamp(max=n_bins - 1)
    return out.view_as(region)


def _batch_tensors(corpus: Corpus, rows: torch.Tensor, pad_id: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, BatchInfo]:
    lengths = corpus.lengths[rows]
    width = int(lengths.max())
    pos = torch.arange(width)
    valid = pos.unsqueeze(0) < lengths.unsqueeze(1)
    flat = (corpus.offsets[rows].unsqueeze(1) + pos).clamp(max=max(corpus.n_tokens - 1, 0))
    input_ids = corpus.tokens[flat].long().masked_fill(~valid, pad_id)
    region = corpus.regions[flat].long().masked_fill(~valid, -1)
    info = BatchInfo(
        valid=valid.to(device), loc=pack_loc(rows.unsqueeze(1), pos.unsqueeze(0)).to(device),
        region=region.clamp(min=0).to(device), think_bin=think_bins(region).to(device), lengths=lengths.to(device),
    )
    return input_ids.to(device), valid.long().to(device), info


@torch.no_grad()
def _run_pass(model: AdapterModel, corpus: Corpus, batches: list[torch.Tensor], stats: dict[int, FeatureStats],
              device: torch.device, n_tokens: int, progress: Progress | None, n_sequences: int) -> None:
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    current: dict[str, Any] = {}
    with model.mode("adapted"), model.capture(layers=list(stats)) as store:

        def hook(layer: int) -> Callable:
            def on_mlp(module, args, output):  # runs right after layer `layer`'s MLP
                f = store[layer].pop()
                stats[layer].update(f, current["batch"])
            return on_mlp

        handles = [model.mlps[layer].register_forward_hook(hook(layer)) for layer in stats]
        done_seq, last = 0, time.monotonic()
        try:
            with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="collect", leave=False) as bar:
                for rows in batches:
                    input_ids, mask, current["batch"] = _batch_tensors(corpus, rows, pad_id, device)
                    model.hf.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                    done_seq += rows.numel()
                    bar.update(int(corpus.lengths[rows].sum()))
                    if progress is not None and (time.monotonic() - last >= PROGRESS_INTERVAL or done_seq == n_sequences):
                        progress(done_seq, n_sequences, f"collected {done_seq}/{n_sequences} sequences")
                        last = time.monotonic()
        finally:
            for h in handles:
                h.remove()
    if progress is not None and n_sequences == 0:
        progress(0, 0, "empty corpus")
