"""Activation checkpointing in the fused step (``fused_step(recompute=True)``): the same loss, terms and
adapter gradients as the default path, far fewer bytes saved for the backward, and a re-run in the backward
that sees the forward's interventions and autocast even after the caller has left them."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_ids, randomize_adapters, tiny_pair
from tests.unit.test_trainer import _float64_model
from training.adapter import AdapterModel, build_adapter_model
from training.config import (
    AdapterConfig,
    LossWeights,
    TrainConfig,
    apply_overrides,
    preset,
    train_config_from_dict,
)
from training.interventions import Intervention
from training.memory_plan import saved_tensor_bytes
from training.step import StepResult, fused_step

L = 4  # layers: enough for a cutoff with adapter blocks below and bridge blocks above it
TERMS = ("loss", "kl", "lm", "nmse", "l1", "bridge_a2t", "bridge_t2a", "nmse_points", "l0_layers")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(3, batch=2, seq=9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in one row
    return ids, mask


def _step(model: AdapterModel, ids, mask, cutoff, recompute: bool,
          intervention: Intervention | None = None) -> tuple[StepResult, list[torch.Tensor]]:
    """One step and its adapter gradients; with an intervention, backward runs *after* leaving intervene()."""
    model.zero_grad(set_to_none=True)
    if intervention is None:
        res = fused_step(model, ids, mask, weights=LossWeights(), cutoff=cutoff, kl_chunk=5, recompute=recompute)
    else:
        with model.intervene(intervention, prompt_lengths=[4, 3]):
            res = fused_step(model, ids, mask, weights=LossWeights(), cutoff=cutoff, kl_chunk=5,
                             recompute=recompute)
    res.loss.backward()
    return res, [p.grad.clone() for p in model.adapter_parameters()]


def _assert_same(a: tuple[StepResult, list[torch.Tensor]], b: tuple[StepResult, list[torch.Tensor]]) -> None:
    (ra, ga), (rb, gb) = a, b
    for name in TERMS:
        x, y = getattr(ra, name), getattr(rb, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-14), name
    assert torch.equal(ra.fired, rb.fired)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backbone,cutoff", [("target", 0), ("target", 2), ("target", L), ("target", None),
                                             ("base", 1), ("base", L)])
def test_recompute_gives_the_default_step_in_float64(backbone, cutoff):
    model = _float64_model(backbone, layers=L)
    ids, mask = _batch()
    default = _step(model, ids, mask, cutoff, recompute=False)
    _assert_same(_step(model, ids, mask, cutoff, recompute=True), default)
    res, grads = default
    assert max(float(g.abs().max()) for g in grads) > 1e-3  # not trivially zero
    if cutoff in (2, 1):
        assert res.bridge_a2t is not None and res.bridge_t2a is not None


def test_recompute_replays_the_forwards_interventions_after_the_caller_left_them():
    model = _float64_model(layers=L)
    ids, mask = _batch()
    # clamp on prompt positions only: the re-run needs the interventions, prompt lengths and positions
    iv = Intervention(features=((0, 3), (1, 5), (2, 0), (3, 7)), mode="clamp", value=1.5, positions="prompt")
    default = _step(model, ids, mask, 2, recompute=False, intervention=iv)
    _assert_same(_step(model, ids, mask, 2, recompute=True, intervention=iv), default)
    assert model.state.interventions == () and model.state.prompt_lengths is None  # the re-runs put them back
    plain = _step(model, ids, mask, 2, recompute=False)
    assert not torch.allclose(plain[1][0], default[1][0])  # the intervention does change the gradients


def _float32_model() -> AdapterModel:
    base, target = tiny_pair(0, layers=L, d=64, intermediate=256, vocab=64)
    for hf in (base, target):  # as on a GPU: SDPA keeps no seq × seq probabilities (tiny_qwen2 is eager)
        hf.config._attn_implementation = "sdpa"
    return randomize_adapters(build_adapter_model(base, target, AdapterConfig(n_features=128)), seed=1, scale=0.05)


def test_recompute_under_bf16_autocast_rebuilds_in_bf16_when_backward_runs_outside_it():
    model = _float32_model()
    ids, mask = _batch()
    runs = []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = fused_step(model, ids, mask, weights=LossWeights(), cutoff=2, recompute=recompute)
        res.loss.backward()  # outside autocast, as the trainer does
        runs.append((res, [p.grad.clone() for p in model.adapter_parameters()]))
    (r0, g0), (r1, g1) = runs
    assert torch.equal(r0.loss, r1.loss)
    for a, b in zip(g0, g1, strict=True):  # a float32 re-run would differ at bf16 precision (~1e-2)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def _saved_bytes(model: AdapterModel, ids, mask, cutoff, recompute: bool) -> int:
    """Bytes of the distinct non-parameter storages saved for the backward during the forward."""
    res, n_bytes = saved_tensor_bytes(model, lambda: fused_step(model, ids, mask, weights=LossWeights(), cutoff=cutoff,
                                                                kl_chunk=16, recompute=recompute))
    res.loss.backward()
    return n_bytes


@pytest.mark.parametrize("cutoff", [1, None])
def test_recompute_saves_a_fraction_of_the_bytes(cutoff):
    model = _float32_model()
    ids = random_ids(5, batch=1, seq=64)
    mask = torch.ones_like(ids)
    default = _saved_bytes(model, ids, mask, cutoff, recompute=False)
    recompute = _saved_bytes(model, ids, mask, cutoff, recompute=True)
    assert recompute < 0.5 * default, (recompute, default)  # measured: ~0.2 at cutoff 1, ~0.3 without bridges


def test_activation_checkpointing_config():
    assert TrainConfig().activation_checkpointing is False
    assert preset("paper-7b").activation_checkpointing is True
    assert apply_overrides(TrainConfig(), ["activation_checkpointing=true"]).activation_checkpointing is True
    assert train_config_from_dict({"activation_checkpointing": True}).activation_checkpointing is True
    with pytest.raises(ValueError, match="activation_checkpointing"):
        train_config_from_dict({"activation_checkpointing": "sometimes"})
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing=1)  # type: ignore[arg-type]
