"""Weight-only feature views: the logit lens and decoder-direction neighbours.

Logit lens convention (one place, used by every page): a feature's decoder column ``W_dec[:, i]`` is
multiplied by the final RMSNorm's gain ``g`` (elementwise; the norm's ``1/rms`` is left out because it
depends on the whole residual stream, not on the feature) and then by the unembedding::

    lens_i = W_U (g ⊙ W_dec[:, i])  −  mean over the vocabulary of the same vector

The mean over the vocabulary is subtracted ("demeaned") because softmax ignores a constant shift, so
only the differences carry meaning; the top and bottom tokens are the same either way. A head bias
(if the model has one) is left out: it does not depend on the feature. With a ``token_mask`` (the
tokenizer's real ids, ``training.generation.token_mask``) the padded rows of the head are left out of the
mean and never listed: they are no token.

Neighbours: cosine similarity of decoder columns among all features of all layers, computed in
chunks on the device (a chunk of query features against every feature); a feature's own column is
excluded, and features whose decoder column is zero (never trained, or dead) have no neighbours and
are nobody's neighbour.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.adapter import AdapterModel

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 28  # elements of one [chunk, vocab] or [chunk, all features] block (1 GiB in fp32)


@dataclass
class LayerLens:
    """Per layer: the ``n`` most promoted and most suppressed tokens of each feature, [F, n]."""

    top_ids: torch.Tensor
    top_values: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_values: torch.Tensor
    hesitation: torch.Tensor | None = None  # [F]: the largest lens value among the hesitation token ids


@dataclass
class LayerNeighbours:
    """Per layer: each feature's nearest decoder directions, [F, n]; ``layer == -1`` pads missing ones."""

    layer: torch.Tensor
    index: torch.Tensor
    cosine: torch.Tensor


def _unembedding(model: AdapterModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U [V, d], final-norm gain [d]) of the adapter model."""
    head = model.hf.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model.hf).__name__} has no output embeddings; cannot build the logit lens")
    norm = getattr(model.hf.model, "norm", None)
    gain = getattr(norm, "weight", None)
    if gain is None:
        raise TypeError(f"{type(model.hf.model).__name__} has no final norm weight (.model.norm.weight)")
    return head.weight, gain


@torch.no_grad()
def logit_lens(model: AdapterModel, *, n: int = 10, layers: list[int] | None = None,
               token_mask: torch.Tensor | None = None,
               hesitation_ids: Sequence[int] | None = None) -> dict[int, LayerLens]:
    """Top and bottom ``n`` tokens of every feature's demeaned logit-lens vector (see module docstring).

    ``token_mask`` [vocab] bool: ids that are tokens (padded vocabulary rows are False and never listed).
    ``hesitation_ids``: the hesitation words' single-token spellings
    (:func:`training.hesitation.hesitation_token_ids`); each feature's *hesitation lens* is its largest
    demeaned lens value among them (how strongly it promotes "Wait" or another hesitation token directly).
    """
    W_U, gain = _unembedding(model)
    vocab = W_U.shape[0]
    keep = None
    if token_mask is not None:
        if token_mask.shape != (vocab,):
            raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, the head has {vocab} rows")
        if not bool(token_mask.all()):
            keep = token_mask.to(W_U.device)
    n = min(n, vocab if keep is None else int(keep.sum()))
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    hes = sorted({int(i) for i in hesitation_ids or () if 0 <= int(i) < vocab})
    hes_idx = torch.tensor(hes, dtype=torch.long, device=W_U.device) if hes else None
    out: dict[int, LayerLens] = {}
    for layer in layers if layers is not None else range(model.n_layers):
        W_dec = model.adapters[layer].W_dec  # [d, F]
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, W_dec.shape[1], chunk):
            dirs = (W_dec[:, start:start + chunk].T * gain).to(W_U.dtype)  # [c, d]
            logits = (dirs @ W_U.T).float()  # [c, V]
            if keep is None:
                logits -= logits.mean(dim=1, keepdim=True)
                top = logits.topk(n, dim=1)
                bottom = logits.topk(n, dim=1, largest=False)
            else:
                logits -= logits[:, keep].mean(dim=1, keepdim=True)
                top = logits.masked_fill(~keep, float("-inf")).topk(n, dim=1)
                bottom = logits.masked_fill(~keep, float("inf")).topk(n, dim=1, largest=False)
            hes_max = logits[:, hes_idx].max(dim=1).values if hes_idx is not None else top.values[:, 0] * float("nan")
            parts.append((top.indices, top.values, bottom.indices, bottom.values, hes_max))
        cat = [torch.cat(p).cpu() for p in zip(*parts, strict=True)]
        out[layer] = LayerLens(cat[0], cat[1], cat[2], cat[3], cat[4] if hes_idx is not None else None)
    return out


@torch.no_grad()
def decoder_neighbours(model: AdapterModel, *, n: int = 10, layers: list[int] | None = None
                       ) -> dict[int, LayerNeighbours]:
    """Each feature's ``n`` highest-cosine decoder columns among all features of all layers."""
    all_layers = list(range(model.n_layers))
    query_layers = layers if layers is not None else all_layers
    F_ = model.n_features
    dirs = torch.cat([model.adapters[i].W_dec.T for i in all_layers])  # [L·F, d]
    norms = dirs.float().norm(dim=1)
    alive = norms > 0
    unit = dirs / norms.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1).to(dirs.dtype)
    total = unit.shape[0]
    n = min(n, total - 1)
    chunk = max(1, _CHUNK_ELEMENTS // total)
    out: dict[int, LayerNeighbours] = {}
    for layer in query_layers:
        parts = []
        for start in range(layer * F_, (layer + 1) * F_, chunk):
            stop = min(start + chunk, (layer + 1) * F_)
            sims = (unit[start:stop] @ unit.T).float()  # [c, L·F]
            sims[:, ~alive] = float("-inf")
            diag = torch.arange(stop - start, device=sims.device)
            sims[diag, diag + start] = float("-inf")  # not oneself
            top = sims.topk(n, dim=1)
            idx = top.indices
            cos = top.values
            missing = ~torch.isfinite(cos) | ~alive[start:stop].unsqueeze(1)
            parts.append((torch.where(missing, -1, idx // F_), torch.where(missing, -1, idx % F_),
                          cos.masked_fill(missing, 0.0)))
        lay, idx, cos = (torch.cat(p).cpu() for p in zip(*parts, strict=True))
        out[layer] = LayerNeighbours(lay, idx, cos)
    return out
