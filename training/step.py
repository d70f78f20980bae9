"""One training step of the paper's objective, fused so it costs ~2 plain forward+backward passes, not ~4.

Objective (Hu et al. 2026): ``w.kl·KL(p_T‖p_A) + w.nmse·NMSE + w.bridge·(KL_A→T + KL_T→A) + w.l1·L1`` at one
cutoff k ∈ {0..L}. How the fused step gets there (see /work/shared/training-notes.md):

1. **Target pass, no grad**: keeps the L+1 residuals (for NMSE), block k's attention output and MLP input
   (for T→A) and the final hidden state (the teacher of all three KL terms).
2. **Adapter pass, with grad**: one forward gives the logits, the features (L1, L0) and the residuals (NMSE).
3. **Bridging from stored states**: with a shared backbone both models have the same attention, so A→T starts
   from the adapter pass's block-k attention output and MLP input (only the target MLP k and blocks > k run),
   T→A from the target pass's (only adapter MLP k and blocks > k run). At k = 0 the T→A model *is* the adapter
   model, at k = L the A→T model is, and those terms reuse the main KL.
4. **One fused, chunked head + KL** for every student against the same teacher rows
   (:func:`training.losses.fused_head_kl`), then one backward of the summed loss by the caller.

With ``recompute=True`` (activation checkpointing) every block of the adapter pass and of both bridges
runs under ``torch.utils.checkpoint``, and so does the NMSE's error h_A − h_T: only the block inputs and
the features (for L1) stay saved, and each block's internals are recomputed in the backward, one block at
a time. That trades ~one more forward of those blocks for most of the activation memory
(training/memory_plan.py).

:func:`reference_step` computes the same numbers the straightforward way (separate forwards through the
Hugging Face decoder layers, full logits); tests compare the two, the benchmark times both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask

from training.adapter import AdaptedMLP, AdapterModel
from training.config import LossWeights
from training.losses import (
    decoder_weighted_l1,
    forward_kl,
    fused_head_kl,
    l0,
    lm_cross_entropy,
    next_token_labels,
    residual_energy,
    residual_nmse,
)

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """All terms of one step. ``loss`` carries the graph; everything else is detached, for logging."""

    loss: torch.Tensor  # weighted total (scalar, differentiable w.r.t. the adapter parameters)
    kl: torch.Tensor  # KL(p_T‖p_A), mean over real positions
    lm: torch.Tensor  # adapter model's next-token cross-entropy (logged only)
    nmse: torch.Tensor  # mean over the L+1 residual points
    l1: torch.Tensor  # decoder-norm-weighted L1, summed over layers
    bridge_a2t: torch.Tensor | None  # None when k = 0 (no adapter block below the cutoff) or no bridging
    bridge_t2a: torch.Tensor | None  # None when k = L or no bridging
    cutoff: int | None
    nmse_points: torch.Tensor  # [L+1]: after embeddings, after each block
    l0_layers: torch.Tensor  # [L] active features per real token
    fired: torch.Tensor  # [L, F] bool: fired at some real position of the batch
    n_tokens: int  # real (non-pad) tokens in the batch

    def terms(self) -> dict[str, float | int | None]:
        """Plain floats for metrics."""
        def val(t: torch.Tensor | None) -> float | None:
            return None if t is None else float(t.detach())
        return {"loss": val(self.loss), "kl": val(self.kl), "lm": val(self.lm), "nmse": val(self.nmse),
                "l1": val(self.l1), "bridge_a2t": val(self.bridge_a2t), "bridge_t2a": val(self.bridge_t2a),
                "cutoff": self.cutoff}


# -- the pieces of a decoder, called directly --------------------------------------------------------------

@dataclass
class _Stack:
    """One model seen as embed → blocks (attention half, MLP half) → final norm → head."""

    hf: nn.Module
    mlp: Callable[[int, torch.Tensor], torch.Tensor]
    ctx: _Context

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.model.embed_tokens(input_ids)

    def attention(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's first half: (residual after attention, MLP input)."""
        layer = self.layers[i]
        attn_out = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=self.ctx.rope,
                                   attention_mask=self.ctx.mask(i))[0]
        a = h + attn_out
        return a, layer.post_attention_layernorm(a)

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        a, x = self.attention(i, h)
        return a + self.mlp(i, x)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return self.hf.model.norm(h)

    @property
    def head(self) -> torch.Tensor:
        head = self.hf.lm_head
        if getattr(head, "bias", None) is not None:
            raise ValueError("lm_head with a bias is not supported by the fused step")
        return head.weight


@dataclass
class _Context:
    """Rotary embeddings and attention masks for one batch, built once per model and shared by all passes."""

    rope: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, torch.Tensor | None]
    layer_types: list[str]

    def mask(self, i: int) -> torch.Tensor | None:
        return self.masks[self.layer_types[i]]


def _context(hf: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Context:
    inner = hf.model
    cfg = inner.config
    probe = inner.embed_tokens.weight.new_empty((input_ids.shape[0], input_ids.shape[1], 1))
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    kwargs = {"config": cfg, "inputs_embeds": probe, "attention_mask": attention_mask, "cache": None,
              "position_ids": position_ids}
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    masks: dict[str, torch.Tensor | None] = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in layer_types:
        from transformers.masking_utils import create_sliding_window_causal_mask

        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    rope = inner.rotary_emb(probe, position_ids)
    return _Context(rope=rope, masks=masks, layer_types=layer_types)


def _adapted_mlp(model: AdapterModel, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base MLP + adapter output, features f) for layer i; interventions in the model state apply."""
    mlp: AdaptedMLP = model.mlps[i]
    f = mlp.features(x)
    return mlp.base_mlp(x) + mlp.adapter.decode(f), f


def _target_mlp(model: AdapterModel, i: int, x: torch.Tensor) -> torch.Tensor:
    target = model.mlps[i].target_mlp
    if target is None:
        raise ValueError("training needs the target MLPs: build the adapter model with keep_target_mlps=True")
    return target(x)


def _stacks(model: AdapterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[_Stack, _Stack]:
    """(adapter stack, target stack). With the target backbone both share every module but the MLPs."""
    a_ctx = _context(model.hf, input_ids, attention_mask)
    adapter = _Stack(model.hf, lambda i, x: _adapted_mlp(model, i, x)[0], a_ctx)
    if model.target_hf is None:
        target = _Stack(model.hf, lambda i, x: _target_mlp(model, i, x), a_ctx)
    else:
        t_layers = model.target_hf.model.layers
        target = _Stack(model.target_hf, lambda i, x: t_layers[i].mlp(x),
                        _context(model.target_hf, input_ids, attention_mask))
    return adapter, target


def _adapter_block(model: AdapterModel, A: _Stack, i: int, h: torch.Tensor,
                   keep_state: bool) -> tuple[torch.Tensor, ...]:
    """Adapter-pass block i: (residual out, features f), plus (attention residual, MLP input) with
    ``keep_state`` (the A→T start at the cutoff). One function so a checkpoint can wrap the whole block."""
    a, x = A.attention(i, h)
    y, f = _adapted_mlp(model, i, x)
    return (a + y, f, a, x) if keep_state else (a + y, f)


Run = Callable[..., object]  # run(fn, *args) → fn(*args), directly or under a checkpoint


def _direct(fn: Callable, *args):
    return fn(*args)


def _checkpointed(model: AdapterModel) -> Run:
    """A runner that checkpoints each call: fn's saved tensors are dropped and fn re-runs in the backward.

    The re-run must compute exactly what the forward did. Everything fn reads is an argument, a frozen
    weight, the batch's masks/rotary tables (kept alive by the closures) or the adapter state's
    intervention fields (interventions, prompt lengths, position ids), which :meth:`AdaptedMLP.features`
    reads at call time. Those would change under a re-run if the caller left an ``intervene`` block, or
    ran another forward, before calling backward; so they are snapshotted here and put back around every
    re-run. Autocast is restored by ``checkpoint`` itself (non-reentrant mode records it); there is no
    randomness in the step (no dropout), and ``checkpoint`` restores the RNG state anyway.
    """
    state = model.state
    frozen = (state.interventions, state.prompt_lengths, state.position_ids)

    def replay(fn: Callable, *args):
        now = (state.interventions, state.prompt_lengths, state.position_ids)
        state.interventions, state.prompt_lengths, state.position_ids = frozen
        try:
            return fn(*args)
        finally:
            state.interventions, state.prompt_lengths, state.position_ids = now

    def run(fn: Callable, *args):
        return checkpoint(replay, fn, *args, use_reentrant=False)

    return run


def _check_batch(model: AdapterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cutoff: int | None) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [batch, seq]")
    if cutoff is not None and not 0 <= cutoff <= model.n_layers:
        raise ValueError(f"bridging cutoff {cutoff} outside 0..{model.n_layers}")


AllSum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks of a data-parallel group


def _global_shares(all_sum: AllSum, hT: list[torch.Tensor], input_ids: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global NMSE denominators [L+1], this rank's share of the real tokens, of the labelled tokens).

    One collective per step: the losses are means over the *global* batch, so each rank scales its local
    means by its share of the denominator; the ranks' terms then add up to the whole batch's exactly.
    """
    local = torch.cat([residual_energy(hT, mask).double(),
                       mask.sum().double().reshape(1),
                       (next_token_labels(input_ids, mask) >= 0).sum().double().reshape(1)])
    total = all_sum(local.clone())
    return total[:-2], local[-2] / total[-2].clamp(min=1), local[-1] / total[-1].clamp(min=1)


def _assemble(model: AdapterModel, weights: LossWeights, *, kl, lm, a2t, t2a, hA, hT, feats, mask,
              cutoff, input_ids: torch.Tensor | None = None, all_sum: AllSum | None = None,
              recompute: bool = False) -> StepResult:
    ref = None
    tok_share = lab_share = None
    if all_sum is not None:
        ref, tok_share, lab_share = _global_shares(all_sum, hT, input_ids, mask)
        kl, a2t, t2a = (None if t is None else t * tok_share.to(t.dtype) for t in (kl, a2t, t2a))
        lm = lm * lab_share.to(lm.dtype)
    nmse, nmse_points = residual_nmse(hA, hT, mask, ref=ref, recompute=recompute)
    l1 = sum((decoder_weighted_l1(f, model.adapters[i].W_dec, mask) for i, f in enumerate(feats)),
             start=torch.zeros((), dtype=nmse.dtype, device=nmse.device))
    if tok_share is not None:
        l1 = l1 * tok_share.to(l1.dtype)
    loss = weights.kl * kl + weights.nmse * nmse + weights.l1 * l1
    for term in (a2t, t2a):
        if term is not None:
            loss = loss + weights.bridge * term
    real = mask.bool().unsqueeze(-1)
    with torch.no_grad():
        l0_layers = torch.stack([l0(f, mask) for f in feats])
        if tok_share is not None:
            l0_layers = l0_layers * tok_share.to(l0_layers.dtype)
        fired = torch.stack([((f > 0) & real).flatten(0, 1).any(0) for f in feats])
    det = (lambda t: None if t is None else t.detach())  # noqa: E731
    return StepResult(loss=loss, kl=kl.detach(), lm=lm.detach(), nmse=nmse.detach(), l1=l1.detach(),
                      bridge_a2t=det(a2t), bridge_t2a=det(t2a), cutoff=cutoff,
                      nmse_points=nmse_points.detach(), l0_layers=l0_layers, fired=fired,
                      n_tokens=int(mask.sum()))


# -- the fused step --------------------------------------------------------------------------------------

def fused_step(model: AdapterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
               weights: LossWeights, cutoff: int | None, kl_chunk: int = 1024,
               all_sum: AllSum | None = None, recompute: bool = False) -> StepResult:
    """All terms of the objective for one batch (right-padded ``input_ids``/``attention_mask`` [batch, seq]).

    ``cutoff``: the bridging cutoff k ∈ {0..L} (drawn by the caller), or None to skip bridging. The caller
    runs ``result.loss.backward()`` once. Position ids are 0..seq-1, as Hugging Face uses without explicit ones.

    ``all_sum``: for data-parallel training, a function summing a tensor over the ranks (every rank calls it
    once per step). The batch is then this rank's slice of a global batch and every number in the result —
    loss, terms, ``nmse_points``, ``l0_layers`` — is this rank's *share* of the global batch's value: summed
    over the ranks they equal a single-process step on the whole batch, and so do the summed gradients.

    ``recompute``: activation checkpointing of every block of the adapter pass and the bridges (see the
    module docstring): the same numbers and gradients, much less memory, ~one more forward of those blocks.
    Without it the step runs the very same operations unwrapped.
    """
    _check_batch(model, input_ids, attention_mask, cutoff)
    L = model.n_layers
    if weights.bridge == 0:
        cutoff = None
    A, T = _stacks(model, input_ids, attention_mask)
    shared = model.target_hf is None
    model.state.position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    # 1. target pass, no grad: residuals for NMSE, block-k state for T→A, final hidden for every KL
    with torch.no_grad():
        h = T.embed(input_ids)
        hT = [h]
        t_state = None  # T→A start: (attention residual, MLP input) at block k, or the residual h_T[k]
        for i in range(L):
            a, x = T.attention(i, h)
            if cutoff == i and cutoff < L:
                t_state = (a, x) if shared else h
            h = a + T.mlp(i, x)
            hT.append(h)
        t_final = T.final(h)

    # 2. adapter pass, with grad: logits (via the final hidden), features, residuals
    run = _checkpointed(model) if recompute else _direct
    h = A.embed(input_ids)
    hA, feats = [h], []
    a_state = None  # A→T start at block k
    for i in range(L):
        at_cut = cutoff == i and cutoff > 0
        if at_cut and not shared:
            a_state = h
        out = run(_adapter_block, model, A, i, h, at_cut and shared)
        h, f = out[0], out[1]
        if at_cut and shared:
            a_state = out[2], out[3]
        hA.append(h)
        feats.append(f)
    a_final = A.final(h)
    students = [(a_final, A.head)]

    # 3. bridging from stored block-k states; the free endpoints reuse the main KL
    a2t_idx = t2a_idx = None
    if cutoff is not None and cutoff > 0:
        if cutoff == L:
            if shared:
                a2t_idx = 0
            else:
                students.append((T.final(hA[L]), T.head))
                a2t_idx = len(students) - 1
        else:
            if shared:
                h = run(lambda a, x: a + T.mlp(cutoff, x), *a_state)
                start = cutoff + 1
            else:
                h, start = a_state, cutoff
            for i in range(start, L):
                h = run(T.block, i, h)
            students.append((T.final(h), T.head))
            a2t_idx = len(students) - 1
    if cutoff is not None and cutoff < L:
        if cutoff == 0 and shared:
            t2a_idx = 0
        else:
            if shared:
                h = run(lambda a, x: a + A.mlp(cutoff, x), *t_state)
                start = cutoff + 1
            else:
                h, start = (hT[0] if cutoff == 0 else t_state), cutoff
            for i in range(start, L):
                h = run(A.block, i, h)
            students.append((A.final(h), A.head))
            t2a_idx = len(students) - 1

    # 4. one chunked head + KL for all students against the same teacher rows
    kls, ces = fused_head_kl(t_final, T.head, students, attention_mask, input_ids, chunk=kl_chunk)
    return _assemble(model, weights, kl=kls[0], lm=ces[0],
                     a2t=None if a2t_idx is None else kls[a2t_idx],
                     t2a=None if t2a_idx is None else kls[t2a_idx],
                     hA=hA, hT=hT, feats=feats, mask=attention_mask, cutoff=cutoff, input_ids=input_ids,
                     all_sum=all_sum, recompute=recompute)


# -- the straightforward reference -------------------------------------------------------------------------

def _hf_segment(model: AdapterModel, hf: nn.Module, h: torch.Tensor, layers: range, mode: str,
                input_ids: torch.Tensor, attention_mask: torch.Tensor, record: list | None = None) -> torch.Tensor:
    """Run whole Hugging Face decoder layers ``layers`` of ``hf`` in MLP ``mode``."""
    ctx = _context(hf, input_ids, attention_mask)
    with model.mode(mode):  # type: ignore[arg-type]
        for i in layers:
            h = hf.model.layers[i](h, attention_mask=ctx.mask(i), position_embeddings=ctx.rope)
            if record is not None:
                record.append(h)
    return h


def reference_step(model: AdapterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   weights: LossWeights, cutoff: int | None) -> StepResult:
    """The same objective as :func:`fused_step`, computed plainly: a separate forward per model and per
    bridging direction, each from the embeddings, through the Hugging Face decoder layers, with full logits.

    Slower (1.4–1.5× the fused step on CPU at the benchmark's shapes) and memory-hungry at large
    vocabularies; it exists to check the fused step and to show what the fusion saves.
    """
    _check_batch(model, input_ids, attention_mask, cutoff)
    L = model.n_layers
    if weights.bridge == 0:
        cutoff = None
    A_hf = model.hf
    T_hf = model.target_hf if model.target_hf is not None else model.hf
    t_mode = "adapted" if model.target_hf is not None else "target"  # a separate target has its own MLPs
    model.state.position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def logits(hf: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return hf.lm_head(hf.model.norm(h))

    with torch.no_grad():
        hT = [T_hf.model.embed_tokens(input_ids)]
        _hf_segment(model, T_hf, hT[0], range(L), t_mode, input_ids, attention_mask, hT)
        t_logits = logits(T_hf, hT[-1])

    hA = [A_hf.model.embed_tokens(input_ids)]
    with model.capture(detach=False) as caught:
        _hf_segment(model, A_hf, hA[0], range(L), "adapted", input_ids, attention_mask, hA)
    feats = [caught[i][0] for i in range(L)]
    a_logits = logits(A_hf, hA[-1])
    kl = forward_kl(t_logits, a_logits, attention_mask)
    lm = lm_cross_entropy(a_logits, input_ids, attention_mask)

    a2t = t2a = None
    if cutoff is not None and cutoff > 0:
        h = _hf_segment(model, A_hf, A_hf.model.embed_tokens(input_ids), range(cutoff), "adapted",
                        input_ids, attention_mask)
        h = _hf_segment(model, T_hf, h, range(cutoff, L), t_mode, input_ids, attention_mask)
        a2t = forward_kl(t_logits, logits(T_hf, h), attention_mask)
    if cutoff is not None and cutoff < L:
        h = _hf_segment(model, T_hf, T_hf.model.embed_tokens(input_ids), range(cutoff), t_mode,
                        input_ids, attention_mask)
        h = _hf_segment(model, A_hf, h, range(cutoff, L), "adapted", input_ids, attention_mask)
        t2a = forward_kl(t_logits, logits(A_hf, h), attention_mask)
    return _assemble(model, weights, kl=kl, lm=lm, a2t=a2t, t2a=t2a, hA=hA, hT=hT, feats=feats,
                     mask=attention_mask, cutoff=cutoff)
