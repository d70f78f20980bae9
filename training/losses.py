"""The paper's loss terms, one pure tensor function each (Hu et al. 2026, §3).

Every function takes a ``mask`` [batch, seq] (1 = real token, 0 = padding) and averages over the real
positions only, so padded batches give the same numbers as their sequences would alone (token-weighted).

- :func:`forward_kl`: mean_t KL(p_T || p_A) at temperature 1 (the main term and both bridging terms).
- :func:`residual_nmse`: Σ‖h_A − h_T‖² / Σ‖h_T‖² per residual point, averaged over points
  (:func:`residual_energy`: the denominators).
- :func:`decoder_weighted_l1`: mean_t Σ_i f_i ‖W_dec[:, i]‖₂ for one layer (summed over layers by the caller).
- :func:`l0`: mean number of active features per token.
- :func:`lm_cross_entropy`: next-token cross-entropy (logged, never trained on).
- :func:`fused_head_kl`: the same KL as :func:`forward_kl`, computed from final hidden states in row chunks
  with the gradient formed on the fly, so the [tokens × vocab] logits never exist whole (152k vocab).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (softmax in bf16 loses too much), float64 kept for exactness tests."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [batch, seq] over positions where ``mask`` is nonzero."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


def kl_per_position(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) at each position: [..., vocab] → [...]."""
    logp_t = F.log_softmax(_wide(target_logits), dim=-1)
    logp_s = F.log_softmax(_wide(student_logits), dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1)


def forward_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over real positions of KL(p_T || p_S); logits [batch, seq, vocab]."""
    return masked_mean(kl_per_position(target_logits, student_logits), mask)


def residual_energy(target: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Σ‖h_T‖² over real positions at each residual point [points]: the denominators of :func:`residual_nmse`."""
    return torch.stack([(_wide(t).square() * mask.to(t.dtype).unsqueeze(-1)).sum() for t in target])


def _squared_error(a: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return ((_wide(a) - _wide(t)).square() * m).sum()


def residual_nmse(adapted: Sequence[torch.Tensor], target: Sequence[torch.Tensor], mask: torch.Tensor, *,
                  ref: torch.Tensor | None = None, recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over points, per-point NMSE [points]) for residual streams [batch, seq, d] at matching points.

    Per point: summed squared error over real positions / summed squared target activations there.
    ``ref`` [points] replaces those denominators: data-parallel training passes the whole global batch's
    energies, so that each rank's NMSE is its share of the global one (a ratio of sums does not split by
    token counts). ``recompute``: the error h_A − h_T (float32 or wider, one [batch, seq, d] per point)
    is recomputed in the backward instead of saved; the checkpoint keeps only h_A and h_T, which the
    caller holds anyway. Same numbers.
    """
    if len(adapted) != len(target):
        raise ValueError(f"{len(adapted)} adapted residual points but {len(target)} target ones")
    energy = residual_energy(target, mask) if ref is None else ref
    per_point = []
    for p, (a, t) in enumerate(zip(adapted, target, strict=True)):
        m = mask.to(a.dtype).unsqueeze(-1)
        if recompute:
            err = checkpoint(_squared_error, a, t, m, use_reentrant=False)
        else:
            err = _squared_error(a, t, m)
        per_point.append(err / energy[p].to(err.dtype).clamp(min=torch.finfo(err.dtype).tiny))
    stacked = torch.stack(per_point)
    return stacked.mean(), stacked


def decoder_weighted_l1(features: torch.Tensor, W_dec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over real positions of Σ_i f_i ‖W_dec[:, i]‖₂ for one layer; f [batch, seq, F], W_dec [d, F].

    Weighting by decoder norms stops the optimiser from shrinking f and growing W_dec to dodge the penalty.
    """
    norms = W_dec.norm(dim=0)  # [F]
    return masked_mean(features @ norms.to(features.dtype), mask)


def l0(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean number of nonzero features per real token; f [batch, seq, F]."""
    return masked_mean((features > 0).sum(-1).to(torch.float32), mask)


def lm_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over positions whose next token is real; logits [batch, seq, vocab]."""
    labels = next_token_labels(input_ids, mask)
    return F.cross_entropy(_wide(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def next_token_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels [batch, seq]: the next token where both it and the current one are real, else IGNORE_INDEX."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    labels[:, :-1] = torch.where(valid, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
    return labels


class _FusedHeadKL(torch.autograd.Function):
    """Σ_t w_t KL(p_T,t || p_S,t) for several students, chunked over rows, gradient formed in the forward.

    d KL / d z_S = p_S − p_T, so the forward can build d loss / d h_S = (w (p_S − p_T)) W_S chunk by chunk
    and keep only that [rows × d] tensor for the backward: no [rows × vocab] tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, teacher_h, teacher_w, weights, labels, chunk, n_students, *students):
        heads, hiddens = students[:n_students], students[n_students:]
        n_rows = teacher_h.shape[0]
        kl = torch.zeros(n_students, dtype=torch.float64, device=teacher_h.device)
        ce = torch.zeros(n_students, dtype=torch.float64, device=teacher_h.device)
        want_grad = [ctx.needs_input_grad[6 + n_students + j] for j in range(n_students)]
        grads = [torch.zeros_like(h) if g else None for h, g in zip(hiddens, want_grad, strict=True)]
        n_labels = (labels != IGNORE_INDEX).sum().clamp(min=1)
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            w = weights[rows]
            logp_t = F.log_softmax(_wide(F.linear(teacher_h[rows], teacher_w)), dim=-1)
            p_t = logp_t.exp()
            neg_entropy = (p_t * logp_t).sum(-1)  # Σ p_T log p_T, shared by every student
            del logp_t
            lab = labels[rows]
            has_label = lab != IGNORE_INDEX
            for j in range(n_students):
                logp_s = F.log_softmax(_wide(F.linear(hiddens[j][rows], heads[j])), dim=-1)
                kl_rows = neg_entropy - (p_t * logp_s).sum(-1)
                kl[j] += (w.to(kl_rows.dtype) * kl_rows).sum().double()
                picked = logp_s.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                ce[j] -= (picked * has_label).sum().double()
                if grads[j] is not None:
                    g_logits = logp_s.exp_().sub_(p_t)  # p_S − p_T, in place: no second [rows × vocab] buffer
                    g_h = g_logits.to(hiddens[j].dtype) @ heads[j].to(hiddens[j].dtype)
                    grads[j][rows] = g_h * w.to(g_h.dtype).unsqueeze(-1)  # row weights on [rows × d], not × vocab
                del logp_s
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.want_grad = want_grad
        ctx.n_students = n_students
        ctx.mark_non_differentiable(ce)
        out_dtype = torch.promote_types(teacher_h.dtype, torch.float32)
        return kl.to(out_dtype), (ce / n_labels).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_kl, grad_ce):
        saved = iter(ctx.saved_tensors)
        grads_h = []
        for j, want in enumerate(ctx.want_grad):
            g = next(saved) if want else None
            grads_h.append(g * grad_kl[j].to(g.dtype) if g is not None else None)
        return (None, None, None, None, None, None, *([None] * ctx.n_students), *grads_h)


def fused_head_kl(teacher_hidden: torch.Tensor, teacher_head: torch.Tensor,
                  students: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                  input_ids: torch.Tensor, *, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_T || p_S) (mean over real positions) and LM cross-entropy for each student, from final hidden states.

    ``teacher_hidden`` [batch, seq, d] (after the final norm, no grad needed) with head weight [vocab, d];
    ``students``: (hidden [batch, seq, d] after the final norm, head weight [vocab, d]) pairs. Heads are
    frozen (no gradient flows to them). Returns (kl [n_students] differentiable w.r.t. the student hiddens,
    cross-entropy [n_students], logged only). Equal to :func:`forward_kl` / :func:`lm_cross_entropy` on full logits.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1 row, not {chunk}")
    m = mask.reshape(-1)
    weights = m.to(torch.promote_types(teacher_hidden.dtype, torch.float32)) / m.sum().clamp(min=1)
    labels = next_token_labels(input_ids, mask).reshape(-1)
    d = teacher_hidden.shape[-1]
    heads = [w.detach() for _, w in students]
    hiddens = [h.reshape(-1, d) for h, _ in students]
    return _FusedHeadKL.apply(teacher_hidden.detach().reshape(-1, d), teacher_head.detach(), weights, labels,
                              chunk, len(students), *heads, *hiddens)
