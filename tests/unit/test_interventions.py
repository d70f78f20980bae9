"""Interventions by exactness: each edit changes what it should, by the amount it should, and nothing else."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from tests.helpers import random_ids, tiny_adapter_model
from training.adapter import AdapterModel
from training.interventions import Intervention, apply_interventions

F = 16


@pytest.fixture(scope="module")
def model() -> AdapterModel:
    return tiny_adapter_model(0, F).requires_grad_(False)


@contextmanager
def recording(model: AdapterModel):
    """layer → list of (MLP input, MLP output) per forward call."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = [
        mlp.register_forward_hook(lambda mod, args, out, i=i: seen.setdefault(i, []).append((args[0], out)))
        for i, mlp in enumerate(model.mlps)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run(model: AdapterModel, ids: torch.Tensor, interventions=(), *, mask=None, prompt_lengths=None):
    """(logits, {layer: MLP output}, {layer: f}) of one forward."""
    with torch.no_grad(), recording(model) as seen, model.intervene(list(interventions), prompt_lengths), \
            model.capture() as f:
        logits = model(ids, attention_mask=mask).logits
    return logits, {i: v[0][1] for i, v in seen.items()}, {i: v[0] for i, v in f.items()}


def active_feature(f: torch.Tensor, row: int, pos: int) -> int:
    idx = int(f[row, pos].argmax())
    assert f[row, pos, idx] > 0
    return idx


@pytest.mark.parametrize("layer", [0, 1])
def test_zeroing_one_feature_removes_exactly_its_decoder_contribution(model, layer):
    ids = random_ids(0, batch=2, seq=8)
    _, out0, f0 = run(model, ids)
    pos = 5
    i = active_feature(f0[layer], 0, pos)
    _, out1, f1 = run(model, ids, [Intervention.zero([(layer, i)], positions=(pos,))])
    for lay in range(layer):  # earlier layers: untouched, bitwise
        assert torch.equal(out0[lay], out1[lay])
    delta = out1[layer] - out0[layer]
    expected = torch.zeros_like(delta)
    expected[:, pos] = -f0[layer][:, pos, i, None] * model.adapters[layer].W_dec[:, i]
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    assert not torch.equal(delta[:, pos], torch.zeros_like(delta[:, pos]))
    mask = torch.ones(8, dtype=torch.bool)
    mask[pos] = False
    assert torch.equal(out0[layer][:, mask], out1[layer][:, mask])  # other positions: bitwise
    for lay in range(layer + 1, model.n_layers):  # later layers: causal, earlier positions untouched
        assert torch.equal(out0[lay][:, :pos], out1[lay][:, :pos])
    assert (f1[layer][:, pos, i] == 0).all()


def test_scale_one_reproduces_exactly(model):
    ids = random_ids(1)
    logits0, _, _ = run(model, ids)
    every = [(lay, i) for lay in range(model.n_layers) for i in range(F)]
    logits1, _, _ = run(model, ids, [Intervention(features=tuple(every), mode="scale", value=1.0)])
    assert torch.equal(logits0, logits1)


def test_scale_and_clamp_set_the_values(model):
    ids = random_ids(2)
    _, _, f0 = run(model, ids)
    i = active_feature(f0[1], 1, 3)
    _, _, f_scaled = run(model, ids, [Intervention(features=((1, i),), mode="scale", value=3.0)])
    torch.testing.assert_close(f_scaled[1][..., i], 3.0 * f0[1][..., i], rtol=0, atol=0)
    _, _, f_clamped = run(model, ids, [Intervention(features=((1, i),), mode="clamp", value=2.5,
                                                     positions=(2, 4))])
    assert (f_clamped[1][:, [2, 4], i] == 2.5).all()
    others = [p for p in range(8) if p not in (2, 4)]
    assert torch.equal(f_clamped[1][:, others], f0[1][:, others])


def test_zeroing_every_feature_equals_hybrid_plus_decoder_biases(model):
    ids = random_ids(3)
    logits, _, f = run(model, ids, [Intervention(features=(), complement=True)])
    assert all(not v.any() for v in f.values())
    handles = [mlp.register_forward_hook(lambda mod, args, out, b=ad.b_dec: out + b)
               for mlp, ad in zip(model.mlps, model.adapters, strict=True)]
    try:
        with torch.no_grad(), model.mode("hybrid"):
            expected = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits, expected)


def test_complement_keeps_only_the_listed_features(model):
    ids = random_ids(4)
    _, _, f0 = run(model, ids)
    keep = [active_feature(f0[0], 0, 2), active_feature(f0[0], 1, 6)]
    _, _, f1 = run(model, ids, [Intervention(features=tuple((0, k) for k in keep), complement=True,
                                             layers=(0,))])
    dropped = [c for c in range(F) if c not in keep]
    assert torch.equal(f1[0][..., keep], f0[0][..., keep])
    assert not f1[0][..., dropped].any()
    assert f1[1].any()  # layer 1 not named: its features still fire


def test_prompt_and_generated_positions_with_left_padding(model):
    """Row 0 is left-padded by 3; positions count real tokens, so both rows split at their prompt length."""
    ids = random_ids(5, batch=2, seq=8)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    _, _, f0 = run(model, ids, mask=mask)
    prompt_lengths = [2, 4]  # row 0: real tokens at indices 3..7, its prompt = indices 3, 4
    edit = [(0, i) for i in range(F)]
    _, _, fp = run(model, ids, [Intervention.zero(edit, positions="prompt")], prompt_lengths=prompt_lengths,
                   mask=mask)
    _, _, fg = run(model, ids, [Intervention.zero(edit, positions="generated")], prompt_lengths=prompt_lengths,
                   mask=mask)
    real_prompt = {0: [3, 4], 1: [0, 1, 2, 3]}
    real_generated = {0: [5, 6, 7], 1: [4, 5, 6, 7]}
    for row in (0, 1):
        assert not fp[0][row, real_prompt[row]].any()
        assert torch.equal(fp[0][row, real_generated[row]], f0[0][row, real_generated[row]])
        assert not fg[0][row, real_generated[row]].any()
        assert torch.equal(fg[0][row, real_prompt[row]], f0[0][row, real_prompt[row]])


def test_explicit_positions_are_logical_in_a_left_padded_batch(model):
    """Editing logical position 1 of a padded row equals editing position 1 of the same prompt alone."""
    prompt = random_ids(6, batch=1, seq=5)
    _, _, f_alone = run(model, prompt)
    i = active_feature(f_alone[0], 0, 1)
    iv = Intervention.zero([(0, i)], positions=(1,))
    alone, _, _ = run(model, prompt, [iv])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], dim=1)
    batched, _, f_batched = run(model, padded, [iv], mask=mask)
    assert f_batched[0][0, 4, i] == 0 and f_batched[0][0, 5, i] > 0  # index 4 = logical position 1
    torch.testing.assert_close(batched[:, 3:], alone, rtol=0, atol=1e-5)
    unedited, _, _ = run(model, prompt)
    assert not torch.allclose(alone, unedited, atol=1e-6)


def test_rows_limit_an_intervention_to_some_batch_rows(model):
    ids = random_ids(7)
    _, _, f0 = run(model, ids)
    _, _, f1 = run(model, ids, [Intervention(features=(), complement=True, layers=(0,), rows=(1,))])
    assert torch.equal(f1[0][0], f0[0][0]) and not f1[0][1].any()


def test_interventions_apply_during_generate(model):
    """Greedy generate with an intervention equals greedy decoding by full forwards with the same edit."""
    prompt = random_ids(8, batch=1, seq=4)
    _, _, f0 = run(model, prompt)
    feats = [(0, i) for i in range(F)] + [(1, i) for i in range(F)]
    iv = Intervention.zero(feats, positions="generated")
    with model.intervene(iv, prompt_lengths=4), model.capture() as f:
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    assert [t.shape[1] for t in f[0]] == [4, 1, 1, 1]  # one prompt forward, then one token per step
    assert torch.equal(f[0][0], f0[0])  # prompt untouched
    assert all(not t.any() for t in f[0][1:] + f[1][1:])  # every generated step edited
    seq = prompt
    for _ in range(4):
        logits, _, _ = run(model, seq, [iv], prompt_lengths=4)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out)
    assert model.state.interventions == () and model.state.captures is None


def test_capture_shapes_values_and_layer_filter(model):
    ids = random_ids(9, batch=3, seq=6)
    inputs: dict[int, torch.Tensor] = {}
    handles = [mlp.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
               for i, mlp in enumerate(model.mlps)]
    try:
        with torch.no_grad(), model.capture() as f:
            model(ids)
        with torch.no_grad(), model.capture(layers=[1]) as only1:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    assert sorted(f) == [0, 1] and all(len(v) == 1 for v in f.values())
    for layer, (got,) in f.items():
        assert got.shape == (3, 6, F)
        ad = model.adapters[layer]
        torch.testing.assert_close(got, torch.relu(inputs[layer] @ ad.W_enc.T + ad.b_enc), rtol=0, atol=1e-6)
    assert list(only1) == [1] and torch.equal(only1[1][0], f[1][0])
    assert model.state.captures is None  # restored on exit


def test_capture_without_detach_keeps_the_graph():
    model = tiny_adapter_model(0, F)
    with model.capture(detach=False) as f:
        model(random_ids(0))
    f[0][0].sum().backward()
    assert model.adapters[0].W_enc.grad is not None


def test_capture_in_hybrid_mode_records_nothing(model):
    with torch.no_grad(), model.mode("hybrid"), model.capture() as f:
        model(random_ids(0))
    assert f == {}


@pytest.mark.parametrize("feature", [(2, 0), (0, F), (-1, 0), (0, -1)])
def test_out_of_range_features_raise(model, feature):
    with pytest.raises(IndexError, match="outside"), model.intervene(Intervention.zero([feature])):
        pass


def test_out_of_range_complement_layers_raise(model):
    with pytest.raises(IndexError, match="layer"), \
            model.intervene(Intervention(features=(), complement=True, layers=(5,))):
        pass


def test_bad_intervention_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        Intervention(features=((0, 1),), mode="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions"):
        Intervention(features=((0, 1),), positions="middle")  # type: ignore[arg-type]


def test_prompt_positions_need_prompt_lengths():
    f = torch.ones(1, 4, 8)
    with pytest.raises(ValueError, match="prompt_lengths"):
        apply_interventions(f, 0, [Intervention.zero([(0, 1)], positions="prompt")], None)


def test_interventions_stack_and_are_restored(model):
    a, b = Intervention.zero([(0, 1)]), Intervention.zero([(1, 2)])
    with model.intervene(a), model.intervene([b]):
        assert model.state.interventions == (a, b)
    assert model.state.interventions == ()


def test_positions_stay_logical_in_cached_decoding_without_position_ids(model):
    """A caller stepping the cache by hand (no position_ids) still gets padding-free positions."""
    ids = random_ids(10, batch=2, seq=6)
    ids[0, :2] = 0
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert model.state.position_ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        model(step, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert model.state.position_ids.tolist() == [[4], [6]]
