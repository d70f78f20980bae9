"""The adapter model's modes against hand-built references, on tiny random Qwen2 and Llama models."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_ids, randomize_adapters, tiny_llama, tiny_pair, tiny_qwen2
from training.adapter import AdaptedMLP, AdapterModel, build_adapter_model, decoder_layers
from training.config import AdapterConfig

F = 16  # features per layer


def adapter_model(seed: int = 0, **cfg_kw) -> AdapterModel:
    base, target = tiny_pair(seed)
    return build_adapter_model(base, target, AdapterConfig(n_features=F, **cfg_kw))


def test_init_leaves_the_hybrid_unchanged():
    model = adapter_model()
    ids = random_ids(0)
    with torch.no_grad():
        adapted = model(ids).logits
        with model.mode("hybrid"):
            hybrid = model(ids).logits
    assert torch.equal(adapted, hybrid)
    for ad in model.adapters:
        bound = 1 / 32**0.5  # U(±1/sqrt(d_model)), d_model = 32
        assert ad.W_enc.abs().max() <= bound and ad.W_enc.std() > bound / 4
        assert not ad.W_dec.any() and not ad.b_enc.any() and not ad.b_dec.any()


def test_trained_adapters_change_the_output():
    model = randomize_adapters(adapter_model())
    ids = random_ids(0)
    with torch.no_grad():
        adapted = model(ids).logits
        with model.mode("hybrid"):
            hybrid = model(ids).logits
    assert (adapted - hybrid).abs().max() > 1e-3


def test_target_mode_equals_the_original_target():
    ids = random_ids(1)
    _, fresh_target = tiny_pair(0)
    model = randomize_adapters(adapter_model())
    with torch.no_grad(), model.mode("target"):
        got = model(ids).logits
    assert torch.equal(got, fresh_target(ids).logits)
    assert model.state.mode == "adapted"  # the context manager restores the mode


def test_hybrid_is_target_backbone_with_base_mlps():
    ids = random_ids(2)
    base, hand = tiny_pair(0)
    for mine, theirs in zip(decoder_layers(hand), decoder_layers(base), strict=True):
        mine.mlp = theirs.mlp
    model = randomize_adapters(adapter_model())
    with torch.no_grad(), model.mode("hybrid"):
        got = model(ids).logits
    assert torch.equal(got, hand(ids).logits)
    base_alone, target_alone = tiny_pair(0)
    assert not torch.allclose(got, target_alone(ids).logits, atol=1e-3)  # the MLP swap matters


def test_adapted_mode_adds_the_adapter_branch_to_each_mlp():
    """Hand-built: the hybrid with a hook adding W_dec ReLU(W_enc x + b_enc) + b_dec to every MLP output."""
    ids = random_ids(3)
    model = randomize_adapters(adapter_model())
    base, hand = tiny_pair(0)
    for i, (mine, theirs) in enumerate(zip(decoder_layers(hand), decoder_layers(base), strict=True)):
        mine.mlp = theirs.mlp
        ad = model.adapters[i]
        mine.mlp.register_forward_hook(
            lambda mod, args, out, ad=ad: out + torch.relu(args[0] @ ad.W_enc.T + ad.b_enc) @ ad.W_dec.T + ad.b_dec)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hand(ids).logits, rtol=0, atol=1e-5)


def test_only_adapter_parameters_require_grad():
    model = adapter_model()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.adapter_parameters()}
    assert len(trainable) == 2 * 4  # W_enc, b_enc, W_dec, b_dec per layer
    assert not any(p.requires_grad for n, p in model.hf.named_parameters() if ".adapter." not in n)
    loss = model(random_ids(0)).logits.sum()
    loss.backward()
    assert model.adapters[0].W_dec.grad is not None and model.adapters[0].W_dec.grad.abs().sum() > 0


def test_mlps_are_adapted_and_share_one_state():
    model = adapter_model()
    assert all(isinstance(m, AdaptedMLP) for m in model.mlps)
    assert all(m.state is model.state for m in model.mlps)
    assert model.n_layers == 2 and model.n_features == F and model.config.hidden_size == 32


def test_no_dec_bias():
    model = adapter_model(dec_bias=False)
    assert all(ad.b_dec is None for ad in model.adapters)
    with torch.no_grad():
        model(random_ids(0))


def test_backbone_base():
    ids = random_ids(4)
    fresh_base, fresh_target = tiny_pair(0)
    base, target = tiny_pair(0)
    model = build_adapter_model(base, target, AdapterConfig(n_features=F, backbone="base"))
    assert model.hf is base and model.target_hf is target
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh_base(ids).logits)  # silent adapters on the base
        with model.mode("hybrid"):
            assert torch.equal(model(ids).logits, fresh_base(ids).logits)
        with model.mode("target"):
            assert torch.equal(model(ids).logits, fresh_target(ids).logits)
    assert not any(p.requires_grad for p in target.parameters())


def test_depth_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="depth or width"):
        build_adapter_model(tiny_qwen2(0, layers=2), tiny_qwen2(1, layers=3), AdapterConfig(n_features=F))


def test_llama_shaped_decoders_work():
    ids = random_ids(5)
    base, target = tiny_llama(0), tiny_llama(1)
    fresh_target = tiny_llama(1)
    model = randomize_adapters(build_adapter_model(base, target, AdapterConfig(n_features=F)))
    with torch.no_grad(), model.mode("target"):
        assert torch.equal(model(ids).logits, fresh_target(ids).logits)
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 8, 64)


def test_unsupported_architecture_is_a_type_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        build_adapter_model(gpt2, gpt2, AdapterConfig(n_features=F))
