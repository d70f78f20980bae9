"""The diff lens against independent forwards on tiny random models (worker/lens/diff.py).

KL values and top tokens are those of separate target, hybrid and adapted forwards; the features listed at a
position are exactly the active ones of the adapted forward; a last-layer feature's direct effect is the logit
change of removing its decoder output there, with the final norm's scale frozen.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import random_ids, tiny_adapter_model, tiny_pair
from training.adapter import decoder_layers
from training.interventions import Intervention
from worker.lens.diff import diff_lens, final_norm, norm_scale

N_FEATURES = 16


@pytest.fixture(scope="module", params=["target", "base"])
def model(request):
    return tiny_adapter_model(0, N_FEATURES, backbone=request.param).eval()


def _ids(seed: int = 4, seq: int = 12) -> list[int]:
    return random_ids(seed, batch=1, seq=seq)[0].tolist()


def _log_probs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _hybrid_by_hand(ids: list[int]) -> torch.Tensor:
    """The target backbone with the base's MLPs, built from fresh copies of the pair (no adapter code)."""
    base, target = tiny_pair(0)
    for mine, theirs in zip(decoder_layers(target), decoder_layers(base), strict=True):
        mine.mlp = theirs.mlp
    return _log_probs(target, ids)


def test_kl_and_top_tokens_equal_separate_forwards(model):
    ids = _ids()
    lens = diff_lens(model, ids, top_k=5, max_features=None)
    with model.mode("adapted"):
        la = _log_probs(model, ids)
    _, fresh_target = tiny_pair(0)
    lt = _log_probs(fresh_target, ids)  # the untouched target model
    if model.cfg.backbone == "target":
        lh = _hybrid_by_hand(ids)
    else:
        with model.mode("hybrid"):
            lh = _log_probs(model, ids)
    pt = lt.exp()
    want_h = (pt * (lt - lh)).sum(-1)
    want_a = (pt * (lt - la)).sum(-1)
    assert lens.kl_hybrid == pytest.approx(want_h.tolist(), rel=1e-4, abs=1e-6)
    assert lens.kl_adapted == pytest.approx(want_a.tolist(), rel=1e-4, abs=1e-6)
    assert min(lens.kl_hybrid) > 0 and min(lens.kl_adapted) > 0
    assert lens.predicted == lt.argmax(-1).tolist()
    for name, lp in (("target", lt), ("hybrid", lh), ("adapted", la)):
        probs, top = lp.exp().topk(5, -1)
        assert [[t for t, _ in lens.top_at(name, i)] for i in range(len(ids))] == top.tolist(), name
        assert [p for i in range(len(ids)) for _, p in lens.top_at(name, i)] == \
            pytest.approx(probs.flatten().tolist(), rel=1e-5)
    assert lens.top["hybrid"] != lens.top["adapted"]  # the adapters change the predictions


def test_features_at_a_position_are_exactly_the_active_ones(model):
    ids = _ids(5)
    lens = diff_lens(model, ids, max_features=None, watch=[(1, 3), (0, 0)])
    with torch.no_grad(), model.capture() as caps:
        model(input_ids=torch.tensor([ids]))
    for pos in range(len(ids)):
        listed = {(ln, ix): a for ln, ix, a, _ in lens.features_at(pos)}
        active = {(ln, ix): float(caps[ln][0][0, pos, ix]) for ln in caps
                  for ix in (caps[ln][0][0, pos] > 0).nonzero().flatten().tolist()}
        assert set(listed) == set(active) and 0 < len(active) < 2 * N_FEATURES
        assert listed == pytest.approx(active, rel=1e-6)
        assert lens.n_active[pos] == len(active)
        effects = [abs(e) for *_, e in lens.features_at(pos)]
        assert effects == sorted(effects, reverse=True)  # ranked by |direct effect|
    assert lens.watched["1/3"] == pytest.approx(caps[1][0][0, :, 3].tolist())
    # the table: every feature active anywhere, with its max activation and where
    table = {(r["layer"], r["index"]): r for r in lens.table}
    for ln in caps:
        f = caps[ln][0][0]  # [T, F]
        for ix in (f > 0).any(0).nonzero().flatten().tolist():
            row = table[(ln, ix)]
            assert row["max_act"] == pytest.approx(float(f[:, ix].max()))
            assert row["pos"] == int(f[:, ix].argmax()) and row["n"] == int((f[:, ix] > 0).sum())
    capped = diff_lens(model, ids, max_features=3)
    for pos in range(len(ids)):  # the cap keeps the strongest effects
        assert [f[:2] for f in capped.features_at(pos)] == [f[:2] for f in lens.features_at(pos)[:3]]


def test_direct_effect_is_the_logit_change_of_removing_a_last_layer_feature(model):
    """Zero one last-layer feature at one position, with the final norm's scale frozen at the unablated value:
    the predicted token's logit changes by exactly the feature's direct effect."""
    ids = _ids(6)
    lens = diff_lens(model, ids, max_features=None)
    last = model.n_layers - 1
    norm, gain, eps = final_norm(model)
    seen: dict[str, torch.Tensor] = {}
    h = norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        clean = model(input_ids=torch.tensor([ids])).logits[0].float()
    h.remove()
    scale = norm_scale(seen["x"][0], eps)  # [T]

    checked = 0
    for pos in (0, 4, len(ids) - 1):
        tok = lens.predicted[pos]
        for ln, ix, _, effect in lens.features_at(pos):
            if ln != last:
                continue
            iv = Intervention(((ln, ix),), mode="zero", positions=(pos,))
            orig_forward = norm.forward
            # the final norm with its scale frozen at the clean forward's: g ⊙ x · s_clean
            norm.forward = lambda x: (gain.float() * x.float() * scale.reshape(1, -1, 1)).to(x.dtype)
            try:
                with torch.no_grad(), model.intervene(iv):
                    ablated = model(input_ids=torch.tensor([ids])).logits[0].float()
            finally:
                norm.forward = orig_forward
            change = float(clean[pos, tok] - ablated[pos, tok])
            assert effect == pytest.approx(change, rel=1e-3, abs=1e-5)
            checked += 1
    assert checked >= 3


def test_bad_input():
    model = tiny_adapter_model(0, N_FEATURES)
    with pytest.raises(ValueError):
        diff_lens(model, [])
