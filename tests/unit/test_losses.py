"""Each loss term against a hand computation on tensors small enough to check on paper."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    IGNORE_INDEX,
    decoder_weighted_l1,
    forward_kl,
    fused_head_kl,
    l0,
    lm_cross_entropy,
    next_token_labels,
    residual_nmse,
)

D = torch.float64


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_forward_kl_is_mean_over_real_positions_of_kl_target_to_student():
    t = [[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [5.0, -5.0, 0.0]]]
    s = [[[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [9.0, 9.0, 9.0]]]
    mask = torch.tensor([[1, 1, 0]])
    got = forward_kl(torch.tensor(t, dtype=D), torch.tensor(s, dtype=D), mask)
    want = (_kl(_softmax(t[0][0]), _softmax(s[0][0])) + _kl(_softmax(t[0][1]), _softmax(s[0][1]))) / 2
    assert got.item() == pytest.approx(want, rel=1e-12)
    # direction matters: KL(p_T || p_S), not the reverse
    reverse = (_kl(_softmax(s[0][0]), _softmax(t[0][0])) + _kl(_softmax(s[0][1]), _softmax(t[0][1]))) / 2
    assert got.item() != pytest.approx(reverse, rel=1e-3)


def test_forward_kl_ignores_padding_and_is_zero_for_equal_logits():
    t = torch.randn(2, 4, 5, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    s = t.clone()
    s[1, 2:] += torch.randn(2, 5, dtype=D) * 10  # garbage only where padded
    assert forward_kl(t, s, mask).item() == pytest.approx(0.0, abs=1e-14)
    s[1, 1, 0] += 1.0  # a real position differs
    assert forward_kl(t, s, mask).item() > 1e-4


def test_residual_nmse_is_summed_error_over_summed_target_per_point_then_averaged():
    mask = torch.tensor([[1, 1, 0]])
    t0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [100.0, 100.0]]], dtype=D)  # Σ target² = 1 + 4 = 5
    a0 = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]], dtype=D)  # Σ err² = 1 + 4 = 5
    t1 = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [7.0, 7.0]]], dtype=D)  # Σ target² = 25
    a1 = torch.tensor([[[3.0, 3.0], [1.0, 0.0], [0.0, 0.0]]], dtype=D)  # Σ err² = 1 + 1 = 2
    mean, per_point = residual_nmse([a0, a1], [t0, t1], mask)
    assert per_point.tolist() == pytest.approx([1.0, 2 / 25])
    assert mean.item() == pytest.approx((1.0 + 2 / 25) / 2)
    with pytest.raises(ValueError, match="residual points"):
        residual_nmse([a0], [t0, t1], mask)


def test_l1_weights_each_feature_by_its_decoder_column_norm():
    f = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.0, 4.0], [9.0, 9.0, 9.0]]], dtype=D)  # [1, 3, F=3]
    W_dec = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.5, 0.0]], dtype=D)  # column norms 5, 0.5, 1
    mask = torch.tensor([[1, 1, 0]])
    want = ((1 * 5 + 2 * 0.5 + 0) + (0.5 * 5 + 0 + 4 * 1)) / 2
    assert decoder_weighted_l1(f, W_dec, mask).item() == pytest.approx(want)
    W2 = W_dec.clone()
    W2[:, 0] *= 3  # tripling feature 0's decoder triples its share of the penalty
    assert decoder_weighted_l1(f, W2, mask).item() == pytest.approx(want + 2 * (1 * 5 + 0.5 * 5) / 2)


def test_l1_gradient_reaches_features_and_decoder():
    f = torch.tensor([[[1.0, 2.0]]], dtype=D, requires_grad=True)
    W = torch.tensor([[3.0, 0.0], [4.0, 1.0]], dtype=D, requires_grad=True)
    decoder_weighted_l1(f, W, torch.ones(1, 1)).backward()
    assert f.grad.flatten().tolist() == pytest.approx([5.0, 1.0])  # d/df_i = ||W[:, i]||
    assert W.grad[:, 0].tolist() == pytest.approx([1 * 3 / 5, 1 * 4 / 5])  # f_i W[:, i] / ||W[:, i]||


def test_l0_counts_active_features_per_real_token():
    f = torch.tensor([[[0.0, 0.1, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    assert l0(f, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.0)
    assert l0(f, torch.tensor([[1, 1, 1]])).item() == pytest.approx(5 / 3)


def test_lm_cross_entropy_predicts_the_next_real_token_only():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [1 / 3] * 3]],
                                    dtype=D))
    ids = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # positions 0 → token 1 (p 0.25), 1 → token 2 (p 0.8); position 2's next token is padding
    assert next_token_labels(ids, mask).tolist() == [[1, 2, IGNORE_INDEX, IGNORE_INDEX]]
    want = -(math.log(0.25) + math.log(0.8)) / 2
    assert lm_cross_entropy(logits, ids, mask).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_head_kl_matches_full_logits_in_value_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 2, 5, 4, 11
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = torch.randint(0, V, (B, T), generator=g)
    ht, Wt, Ws = (torch.randn(*s, generator=g, dtype=D) for s in [(B, T, d), (V, d), (V, d)])
    h1 = torch.randn(B, T, d, generator=g, dtype=D, requires_grad=True)
    h2 = torch.randn(B, T, d, generator=g, dtype=D, requires_grad=True)

    kl, ce = fused_head_kl(ht, Wt, [(h1, Ws), (h2, Wt)], mask, ids, chunk=chunk)
    (0.5 * kl[0] + 3.0 * kl[1]).backward()
    fused_grads = (h1.grad.clone(), h2.grad.clone())
    h1.grad = h2.grad = None

    full = [forward_kl(ht @ Wt.T, h1 @ Ws.T, mask), forward_kl(ht @ Wt.T, h2 @ Wt.T, mask)]
    (0.5 * full[0] + 3.0 * full[1]).backward()
    assert torch.allclose(kl, torch.stack(full).detach(), rtol=1e-13, atol=0)
    assert torch.allclose(fused_grads[0], h1.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(fused_grads[1], h2.grad, rtol=1e-12, atol=1e-15)
    assert ce[0].item() == pytest.approx(lm_cross_entropy(h1 @ Ws.T, ids, mask).item(), rel=1e-12)
    assert fused_grads[0][1, 3:].abs().max() == 0  # padded rows get no gradient


def test_fused_head_kl_rejects_bad_chunk():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="chunk"):
        fused_head_kl(x, torch.zeros(4, 3), [(x, torch.zeros(4, 3))], torch.ones(1, 2), torch.zeros(1, 2).long(),
                      chunk=0)
