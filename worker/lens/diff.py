"""The diff lens computation: one text, three models, per-position differences and the features behind them.

On the same token ids ``[T]`` the adapter model runs three forwards (its modes, :mod:`training.adapter`):

1. ``target``: the reasoning model's next-token distributions ``p_t``;
2. ``hybrid`` (adapters off): ``p_h``;
3. ``adapted``: ``p_a``, with every layer's adapter activations ``f_l`` [T, F] captured, and the residual
   stream entering the final norm ``x`` [T, d] (to freeze the norm's scale).

Per position it keeps KL(p_t‖p_h) and KL(p_t‖p_a) (nats), each model's top-k tokens with probabilities, and
the active adapter features (``f > 0``) with their activation and their *direct effect* on the target's
predicted token ``y = argmax p_t``::

    effect(l, i) = f_l[i] · ( W_U[y] · (g ⊙ W_dec_l[:, i]) ) · s        s = 1 / sqrt(mean(x²) + eps)

that is, the feature's decoder output read through the final RMSNorm with its scale ``s`` frozen at the value
of the adapted forward, and the unembedding row of ``y`` (a head bias does not depend on the feature). At the
last layer this is exactly the logit change of removing the feature's decoder output with ``s`` frozen
(tests/unit/test_lens.py checks it by intervention); at earlier layers it is the direct path only.

Positions keep at most ``max_features`` features each (largest |effect| first; ``n_active`` says how many were
active); the per-text feature table (max activation, where, how often, strongest effect) covers every active
feature, and ``watch`` features keep their full activation trace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from training.adapter import AdapterModel

log = logging.getLogger(__name__)

TOP_K = 5  # next tokens kept per model and position
MAX_FEATURES = 32  # features kept per position (largest |direct effect| first)
MAX_TABLE = 1000  # rows of the per-text feature table (largest max activation first)


@dataclass
class LensResult:
    """The lens of one text. Lists are per position (``len(token_ids)``), in columns (compact to store and quick
    to build): ``top[model][pos] = [token ids, probabilities]``, ``features[pos] = [layers, indices, activations,
    direct effects]``; ``table`` rows ``{layer, index, max_act, pos, n, effect}`` (``effect``: the largest |direct
    effect| over the text, signed); ``watched`` maps ``"layer/index"`` to its activation at every position."""

    token_ids: list[int]
    predicted: list[int]
    kl_hybrid: list[float]
    kl_adapted: list[float]
    top: dict[str, list[list[list]]]  # model → position → [token ids, probabilities]
    features: list[list[list]]  # position → [layers, indices, activations, direct effects]
    n_active: list[int]
    table: list[dict[str, Any]]
    watched: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def features_at(self, pos: int) -> list[tuple[int, int, float, float]]:
        """``(layer, index, activation, direct effect)`` of the features kept at ``pos``, largest |effect| first."""
        return list(zip(*self.features[pos], strict=True))

    def top_at(self, model: str, pos: int) -> list[tuple[int, float]]:
        """``(token id, probability)`` of ``model``'s top tokens at ``pos``, most probable first."""
        return list(zip(*self.top[model][pos], strict=True))

    def to_json(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids, "predicted": self.predicted,
            "kl_hybrid": self.kl_hybrid, "kl_adapted": self.kl_adapted,
            "top": self.top, "features": self.features,  # plain lists of Python numbers already
            "n_active": self.n_active, "table": self.table, "watched": self.watched,
        }


def final_norm(model: AdapterModel) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """(module, gain [d], eps) of the adapted model's final RMSNorm (``model.hf.model.norm``)."""
    norm = getattr(model.hf.model, "norm", None)
    gain = getattr(norm, "weight", None)
    if norm is None or gain is None:
        raise TypeError(f"{type(model.hf.model).__name__} has no final RMSNorm with a weight (.model.norm)")
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm, gain, float(eps)


def norm_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm scale ``1/sqrt(mean(x²) + eps)`` per position, in fp32: x [..., d] → [...]."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def kl(log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p‖q) in nats over the last axis, from log-probabilities (``p``: ``log_p.exp()`` when already known)."""
    return ((log_p.exp() if p is None else p) * (log_p - log_q)).sum(-1)


def _top(log_p: torch.Tensor, k: int) -> list[list[list]]:
    vals, idx = log_p.topk(k, dim=-1)  # one conversion each: per-row ones cost more than the forward
    return [[i, v] for i, v in zip(idx.tolist(), vals.exp().tolist(), strict=True)]


@torch.no_grad()
def forwards(model: AdapterModel, ids: torch.Tensor) -> dict[str, Any]:
    """The three forwards on ``ids`` [T]: log-probabilities per mode [T, V] (fp32), the adapted forward's adapter
    activations per layer [T, F] and the residual entering the final norm [T, d]."""
    batch = ids.reshape(1, -1).to(next(model.parameters()).device)
    out: dict[str, Any] = {"seconds": {}}
    for mode in ("target", "hybrid"):
        t0 = time.perf_counter()
        with model.mode(mode):
            out[mode] = F.log_softmax(model(input_ids=batch, use_cache=False).logits[0].float(), -1)
        out["seconds"][mode] = time.perf_counter() - t0
    norm, _, _ = final_norm(model)
    seen: dict[str, torch.Tensor] = {}
    hook = norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    t0 = time.perf_counter()
    try:
        with model.mode("adapted"), model.capture() as caps:
            out["adapted"] = F.log_softmax(model(input_ids=batch, use_cache=False).logits[0].float(), -1)
    finally:
        hook.remove()
    out["seconds"]["adapted"] = time.perf_counter() - t0
    out["acts"] = {layer: fs[0][0] for layer, fs in caps.items()}  # [T, F]
    out["resid"] = seen["x"][0]  # [T, d]
    return out


@torch.no_grad()
def readout(model: AdapterModel, resid: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Per position, the direction whose dot product with a residual-stream write is its logit change for
    ``token_ids`` [T] through the final norm with its scale frozen: ``W_U[y] ⊙ g · s`` [T, d] (``resid`` [T, d]:
    the residual entering the final norm)."""
    _, gain, eps = final_norm(model)
    W_U = model.hf.get_output_embeddings().weight  # [V, d]
    return W_U[token_ids.to(W_U.device)].float() * gain.float() * norm_scale(resid, eps).unsqueeze(-1)


@torch.no_grad()
def diff_lens(model: AdapterModel, token_ids: Sequence[int], *, top_k: int = TOP_K,
              max_features: int | None = MAX_FEATURES, max_table: int | None = MAX_TABLE,
              watch: Sequence[tuple[int, int]] = ()) -> LensResult:
    """The lens of ``token_ids`` (see the module docstring). ``max_features=None`` keeps every active feature."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the lens needs at least one token")
    fw = forwards(model, ids)
    t0 = time.perf_counter()
    lt, lh, la = fw["target"], fw["hybrid"], fw["adapted"]
    predicted = lt.argmax(-1)  # [T]
    layers = sorted(fw["acts"])
    n_feat = model.n_features
    acts = torch.cat([fw["acts"][layer].float() for layer in layers], dim=1)  # [T, L·F]
    W_dec = torch.cat([model.adapters[layer].W_dec for layer in layers], dim=1)  # [d, L·F]
    # (fewer big temporaries: each fresh one costs page faults on the CPU)
    effects = (readout(model, fw["resid"], predicted) @ W_dec.float()).mul_(acts)  # [T, L·F], 0 where inactive
    active = acts > 0
    n_active = active.sum(1)
    # |effect|, nudged up by the activation so that an active feature always outranks the inactive ones
    score = effects.abs().add_(acts, alpha=1e-30)
    # per position: the active features with the largest |effect| (inactive ones are dropped)
    k = acts.shape[1] if max_features is None else min(max_features, acts.shape[1])
    order = score.topk(k, dim=1).indices  # [T, k]
    del score
    layer_of = torch.tensor(layers, device=acts.device).repeat_interleave(n_feat)
    # active features score above every inactive one, so each row's first min(k, n_active) entries are kept
    n_kept = n_active.clamp(max=k).tolist()
    cols = [t.cpu().tolist() for t in (layer_of[order], order % n_feat, acts.gather(1, order), effects.gather(1, order))]
    per_pos = [[ls[:n], ixs[:n], as_[:n], es[:n]] for n, ls, ixs, as_, es in zip(n_kept, *cols, strict=True)]
    # the per-text table: every feature active somewhere, largest max activation first (ties: layer, index)
    count = active.sum(0)
    max_act = acts.amax(0)
    where = acts.T.contiguous().argmax(1)  # contiguous rows reduce several times faster than columns
    most, least = effects.amax(0), effects.amin(0)
    effect = torch.where(most >= -least, most, least)  # its effect of largest magnitude (0 at inactive places)
    fired = (count > 0).nonzero(as_tuple=True)[0]
    fired = fired[torch.argsort(-max_act[fired], stable=True)]
    if max_table:
        fired = fired[:max_table]
    table_cols = [t.cpu().tolist() for t in (layer_of[fired], fired % n_feat, max_act[fired], where[fired],
                                             count[fired], effect[fired])]
    rows = [{"layer": ln, "index": ix, "max_act": a, "pos": p, "n": n, "effect": e}
            for ln, ix, a, p, n, e in zip(*table_cols, strict=True)]
    pt = lt.exp()
    watched = {}
    for layer, index in watch:
        acts = fw["acts"].get(int(layer))
        if acts is not None and 0 <= int(index) < acts.shape[1]:
            watched[f"{int(layer)}/{int(index)}"] = acts[:, int(index)].float().cpu().tolist()
    result = LensResult(
        token_ids=ids.tolist(), predicted=predicted.cpu().tolist(),
        kl_hybrid=kl(lt, lh, pt).cpu().tolist(), kl_adapted=kl(lt, la, pt).cpu().tolist(),
        top={"target": _top(lt, top_k), "hybrid": _top(lh, top_k), "adapted": _top(la, top_k)},
        features=per_pos, n_active=n_active.cpu().tolist(), table=rows,
        watched=watched, seconds=dict(fw["seconds"]))
    result.seconds["features"] = time.perf_counter() - t0
    return result
