"""The lockstep generation loop of ablations: exactness against plain forwards, KL, stopping, cancelling."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_adapter_model
from training.adapter import AdapterModel
from training.interventions import Intervention
from worker.ablation.generate import (
    ABLATED,
    UNABLATED,
    SamplingSettings,
    Track,
    ablation_tracks,
    collect,
    collect_prompts,
    generate,
    lockstep,
    lockstep_prompts,
)

N_FEATURES = 16
PROMPT = [1, 5, 9, 14, 3, 22]


@pytest.fixture(scope="module")
def model() -> AdapterModel:
    return tiny_adapter_model(0, n_features=N_FEATURES)


def _all_features(model: AdapterModel) -> list[tuple[int, int]]:
    return [(layer, i) for layer in range(model.n_layers) for i in range(model.n_features)]


def _full_logprobs(model: AdapterModel, ids: list[int], ivs=(), prompt_len: int | None = None) -> torch.Tensor:
    """Log-probs at every position from one uncached forward over ``ids``: [T, V]."""
    with torch.no_grad(), model.intervene(list(ivs), prompt_lengths=prompt_len):
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_scale_one_reproduces_unablated_tokens_exactly(model, temperature):
    settings = SamplingSettings(max_new_tokens=16, temperature=temperature, seed=7)
    identity = Intervention(tuple(_all_features(model)), mode="scale", value=1.0)
    out = collect(lockstep(model, PROMPT, ablation_tracks([identity]), settings))
    assert out[ABLATED].token_ids == out[UNABLATED].token_ids
    assert out[ABLATED].logprobs == out[UNABLATED].logprobs
    assert all(kl == 0.0 for kl in out[ABLATED].kls)
    assert generate(model, PROMPT, settings).token_ids == out[UNABLATED].token_ids  # alone == in lockstep


def test_zeroing_every_feature_is_the_hybrid_plus_decoder_biases(model):
    settings = SamplingSettings(max_new_tokens=16, temperature=1.0, seed=3)
    everything = Intervention((), mode="zero", complement=True)  # complement of nothing, every layer
    zeroed = generate(model, PROMPT, settings, interventions=[everything])

    def add_bias(mlp, args, out):
        return out + mlp.adapter.b_dec

    handles = [mlp.register_forward_hook(add_bias) for mlp in model.mlps]
    try:
        hybrid_plus_bias = generate(model, PROMPT, settings, mode="hybrid")
    finally:
        for h in handles:
            h.remove()
    plain_hybrid = generate(model, PROMPT, settings, mode="hybrid")
    assert zeroed.token_ids == hybrid_plus_bias.token_ids
    assert zeroed.logprobs == hybrid_plus_bias.logprobs
    assert zeroed.logprobs != plain_hybrid.logprobs  # the biases matter in this model: the test can fail


def test_kl_and_logprobs_match_uncached_forwards(model):
    """Per-token KL is KL(unablated ‖ ablated), both given the ablated text so far."""
    iv = Intervention(((0, 1), (0, 4), (1, 2), (1, 9)), mode="clamp", value=3.0)
    out = collect(lockstep(model, PROMPT, ablation_tracks([iv]), SamplingSettings(max_new_tokens=12)))
    ablated = out[ABLATED]
    text = PROMPT + ablated.token_ids
    p_abl = _full_logprobs(model, text, [iv])[len(PROMPT) - 1:-1]
    p_ref = _full_logprobs(model, text)[len(PROMPT) - 1:-1]
    kl = (p_ref.exp() * (p_ref - p_abl)).sum(-1)
    assert torch.allclose(torch.tensor(ablated.kls), kl, atol=1e-5)
    assert max(ablated.kls) > 1e-3
    chosen = p_abl.gather(-1, torch.tensor(ablated.token_ids).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(ablated.logprobs), chosen, atol=1e-5)
    assert ablated.token_ids == p_abl.argmax(-1).tolist()  # greedy on the ablated model's own distribution


def test_positions_split_at_the_prompt_length(model):
    feats = tuple((0, i) for i in range(N_FEATURES))
    settings = SamplingSettings(max_new_tokens=6)
    gen_only = collect(lockstep(model, PROMPT, ablation_tracks([Intervention(feats, positions="generated")]),
                                settings))[ABLATED]
    assert gen_only.kls[0] == 0.0  # the first token is predicted from prompt positions only
    assert max(gen_only.kls[1:]) > 0.0
    prompt_only = Intervention(feats, positions="prompt")
    out = collect(lockstep(model, PROMPT, ablation_tracks([prompt_only]), settings))[ABLATED]
    p = _full_logprobs(model, PROMPT + out.token_ids, [prompt_only], prompt_len=len(PROMPT))
    assert out.token_ids == p[len(PROMPT) - 1:-1].argmax(-1).tolist()


def test_a_track_that_stops_early_leaves_the_others_unchanged(model):
    iv = Intervention(tuple((1, i) for i in range(N_FEATURES)), mode="scale", value=4.0)
    settings = SamplingSettings(max_new_tokens=14, temperature=1.0, seed=11)
    ablated = generate(model, PROMPT, settings, interventions=[iv]).token_ids
    unablated = generate(model, PROMPT, settings).token_ids
    stop = next(t for t in unablated[:6] if t not in ablated)  # precondition: ends only the unablated run
    stopping = SamplingSettings(max_new_tokens=14, temperature=1.0, seed=11, stop_ids=(stop,))
    out = collect(lockstep(model, PROMPT, ablation_tracks([iv]), stopping))
    assert out[UNABLATED].stop == "eos" and out[UNABLATED].token_ids[-1] == stop
    assert out[UNABLATED].token_ids == unablated[:unablated.index(stop) + 1]
    assert out[ABLATED].token_ids == ablated and out[ABLATED].stop == "max_new_tokens"
    assert all(kl is not None for kl in out[ABLATED].kls)  # its reference row stayed with it


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_several_prompts_at_once_match_each_prompt_alone(model, temperature):
    """Left padding, logical positions and per-prompt budgets: a batch of prompts is each prompt alone."""
    prompts = [PROMPT, [1, 7, 3], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]]
    iv = Intervention(tuple((layer, i) for layer in range(2) for i in range(0, N_FEATURES, 3)), mode="scale",
                      value=3.0, positions="generated")
    settings = SamplingSettings(max_new_tokens=10, temperature=temperature, seed=4, context_length=18)
    together = collect_prompts(lockstep_prompts(model, prompts, ablation_tracks([iv]), settings), len(prompts))
    for prompt, got in zip(prompts, together, strict=True):
        alone = collect(lockstep(model, prompt, ablation_tracks([iv]), settings))
        for name in (ABLATED, UNABLATED):
            assert got[name].token_ids == alone[name].token_ids
            assert got[name].stop == alone[name].stop
            assert got[name].logprobs == pytest.approx(alone[name].logprobs, abs=1e-4)
        assert got[ABLATED].kls == pytest.approx(alone[ABLATED].kls, abs=1e-4)
    assert [len(g[ABLATED].token_ids) for g in together] == [10, 10, 8]  # the last one meets the context
    assert together[2][ABLATED].stop == "context"


def test_context_length_caps_the_generation(model):
    out = generate(model, PROMPT, SamplingSettings(max_new_tokens=50, context_length=len(PROMPT) + 4))
    assert len(out.token_ids) == 4 and out.stop == "context"
    with pytest.raises(ValueError, match="leaves no room in the model's context of 6"):
        generate(model, PROMPT, SamplingSettings(context_length=len(PROMPT)))


def test_seed_fixes_sampling(model):
    a = generate(model, PROMPT, SamplingSettings(max_new_tokens=20, temperature=1.5, seed=1)).token_ids
    b = generate(model, PROMPT, SamplingSettings(max_new_tokens=20, temperature=1.5, seed=1)).token_ids
    c = generate(model, PROMPT, SamplingSettings(max_new_tokens=20, temperature=1.5, seed=2)).token_ids
    assert a == b and a != c


def test_closing_the_iterator_cancels_and_leaves_the_model_clean(model):
    iv = Intervention(((0, 1),), mode="zero")
    steps = lockstep(model, PROMPT, ablation_tracks([iv]), SamplingSettings(max_new_tokens=100))
    seen = [next(steps) for _ in range(3)]
    steps.close()
    assert [s[0].index for s in seen] == [0, 1, 2]
    assert model.state.interventions == () and model.state.mode == "adapted"
    with pytest.raises(StopIteration):
        next(steps)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"temperature": -1.0}, "temperature must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


def test_bad_tracks_and_prompts_are_refused(model):
    settings = SamplingSettings(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], settings)
    with pytest.raises(ValueError, match="not a sampling track"):
        next(lockstep(model, PROMPT, [Track("a"), Track("b", follows="nope")], settings))
    with pytest.raises(ValueError, match="unique"):
        next(lockstep(model, PROMPT, [Track("a"), Track("a")], settings))
    with pytest.raises(IndexError, match=r"feature \(0, 99\)"):
        generate(model, PROMPT, settings, interventions=[Intervention(((0, 99),))])
