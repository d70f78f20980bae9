"""The training memory plan: parameter counts from config.json, the 7B numbers, and the activation
estimate checked against what the fused step really saves for its backward (saved-tensor hooks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import tiny_qwen2
from training.adapter import build_adapter_model
from training.config import AdapterConfig, LossWeights
from training.memory_plan import (
    GB,
    NAMED_SHAPES,
    ModelShape,
    max_seq_len_for,
    plan_memory,
    resolve_shape,
    saved_tensor_bytes,
)
from training.step import fused_step


def test_parameter_counts_match_real_models() -> None:
    # published sizes: Qwen2.5-7B 7.62 B, Qwen2.5-0.5B 0.49 B, Llama-3.1-8B 8.03 B
    assert NAMED_SHAPES["qwen2.5-7b"].total_params() == pytest.approx(7.62e9, rel=0.002)
    assert NAMED_SHAPES["qwen2.5-0.5b"].total_params() == pytest.approx(0.494e9, rel=0.002)
    assert NAMED_SHAPES["llama-3.1-8b"].total_params() == pytest.approx(8.03e9, rel=0.002)
    model = tiny_qwen2(0, layers=3, d=32, intermediate=48, vocab=80)
    shape = ModelShape.from_hf_config(model.config.to_dict())
    assert shape.total_params() == sum(p.numel() for p in model.parameters())


def test_shape_from_a_model_directory(tmp_path: Path) -> None:
    tiny_qwen2(0, layers=2, d=32).config.save_pretrained(tmp_path)
    assert resolve_shape(tmp_path).n_layers == 2
    assert resolve_shape(tmp_path / "config.json").d_model == 32
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="num_attention_heads"):
        resolve_shape(tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown model shape 'qwen9-1t'"):
        resolve_shape("qwen9-1t")


def test_paper_pair_numbers() -> None:
    plan = plan_memory("qwen2.5-math-7b", "deepseek-r1-distill-qwen-7b", n_features=8192, seq_len=10240)
    assert plan.item("target model").bytes / GB == pytest.approx(15.23, abs=0.01)
    assert plan.item("base MLPs").bytes / GB == pytest.approx(28 * 3 * 3584 * 18944 * 2 / GB)
    assert plan.item("adapters").bytes == 28 * (2 * 3584 * 8192 + 8192 + 3584) * 2
    assert plan.item("AdamW moments").bytes == 2 * plan.item("adapters").bytes
    assert not plan.fits(80)  # the paper's 10k-token sequences do not fit one 80 GB GPU without more tricks
    longest = max_seq_len_for(80, "qwen2.5-7b", "qwen2.5-7b")
    assert 1000 < longest < 10240
    assert plan_memory("qwen2.5-7b", "qwen2.5-7b", seq_len=longest).fits(80)
    assert not plan_memory("qwen2.5-7b", "qwen2.5-7b", seq_len=longest + 1).fits(80)
    # with activation checkpointing the paper's 10,240 tokens fit one 80 GB GPU, the weights unchanged
    rc = plan_memory("qwen2.5-math-7b", "deepseek-r1-distill-qwen-7b", n_features=8192, seq_len=10240, recompute=True)
    assert rc.fits(80) and 55 * GB < rc.total < 70 * GB and rc.recompute and rc.to_dict()["recompute"]
    assert rc.item("AdamW moments").bytes == plan.item("AdamW moments").bytes
    assert rc.item("activations: adapter pass").bytes < plan.item("activations: adapter pass").bytes / 4
    rc_longest = max_seq_len_for(80, "qwen2.5-7b", "qwen2.5-7b", recompute=True)
    assert 10240 < rc_longest and plan_memory("qwen2.5-7b", "qwen2.5-7b", seq_len=rc_longest, recompute=True).fits(80)
    with pytest.raises(ValueError, match="n_layers"):
        plan_memory("qwen2.5-0.5b", "qwen2.5-7b")
    with pytest.raises(ValueError, match="seq_len"):
        plan_memory("qwen2.5-7b", "qwen2.5-7b", seq_len=0)


def _saved_bytes(L: int, d: int, mlp: int, F: int, T: int, cutoff: int, recompute: bool = False) -> int:
    """Bytes of the distinct non-parameter tensors one fused step saves for its backward (float32, CPU).

    With ``recompute`` the NMSE's checkpoints hold the teacher pass's L+1 residuals, which the plan counts
    as teacher states (they are alive anyway): those are left out here.
    """
    torch.manual_seed(0)
    base = tiny_qwen2(0, layers=L, d=d, intermediate=mlp, vocab=256)
    target = tiny_qwen2(1, layers=L, d=d, intermediate=mlp, vocab=256)
    for m in (base, target):  # as on a GPU: SDPA keeps no seq × seq probabilities (tiny_qwen2 is eager)
        m.config._attn_implementation = "sdpa"
    model = build_adapter_model(base, target, AdapterConfig(n_features=F))
    with torch.no_grad():
        for ad in model.adapters:
            ad.W_dec.normal_(std=0.05)
    ids = torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(0))
    res, n_bytes = saved_tensor_bytes(model, lambda: fused_step(model, ids, torch.ones_like(ids), weights=LossWeights(),
                                                                cutoff=cutoff, kl_chunk=64, recompute=recompute))
    res.loss.backward()  # with recompute: also checks the backward runs on these shapes
    teacher = (L + 1) * T * d * 4 if recompute else 0
    return n_bytes - teacher


@pytest.mark.parametrize("shape", [(4, 64, 256, 128), (6, 96, 384, 256)], ids=["d64", "d96"])
def test_activation_estimate_matches_saved_tensors(shape: tuple[int, int, int, int]) -> None:
    L, d, mlp, F = shape
    T = 128
    measured = _saved_bytes(L, d, mlp, F, T, cutoff=1)  # the worst cutoff: both bridges span L-1 blocks
    tiny = ModelShape("tiny", L, d, mlp, 4, 2, 256)
    plan = plan_memory(tiny, tiny, n_features=F, seq_len=T, precision="fp32", weight_dtype="fp32")
    estimate = plan.item("activations: adapter pass").bytes + plan.item("activations: bridging (k = 1)").bytes
    assert estimate == pytest.approx(measured, rel=0.25)


@pytest.mark.parametrize("shape", [(4, 64, 256, 128), (6, 96, 384, 256), (3, 128, 512, 64)],
                         ids=["d64", "d96", "d128"])
def test_recompute_activation_estimate_matches_saved_tensors(shape: tuple[int, int, int, int]) -> None:
    L, d, mlp, F = shape
    T = 128
    measured = _saved_bytes(L, d, mlp, F, T, cutoff=1, recompute=True)
    tiny = ModelShape("tiny", L, d, mlp, 4, 2, 256)
    plan = plan_memory(tiny, tiny, n_features=F, seq_len=T, precision="fp32", weight_dtype="fp32", recompute=True)
    estimate = plan.item("activations: adapter pass").bytes + plan.item("activations: bridging (k = 1)").bytes
    assert estimate == pytest.approx(measured, rel=0.25)
    # what one block saves without checkpointing: the peak while it is recomputed in the backward
    one_block = plan_memory(tiny, tiny, n_features=F, seq_len=T, precision="fp32", weight_dtype="fp32",
                            bridging=False).item("activations: adapter pass").bytes / L
    assert plan.item("activations: one block recomputed").bytes == pytest.approx(one_block)


def test_plan_command() -> None:
    from app.cli import app

    out = CliRunner().invoke(app, ["plan", "--target", "qwen2.5-7b", "--seq-len", "2048", "--gpu-gb", "80", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["fits"] is True and data["max_seq_len"] > 2048 and data["seq_len"] == 2048
    assert data["recompute"] is True  # the default: the paper-7b preset checkpoints activations
    out = CliRunner().invoke(app, ["plan", "--gpu-gb", "80", "--json", "--no-recompute"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["recompute"] is False and data["fits"] is False and 2048 < data["max_seq_len"] < 10240
    text = CliRunner().invoke(app, ["plan", "--width", "4096"])
    assert text.exit_code == 0 and "AdamW moments" in text.output and "total" in text.output
    bad = CliRunner().invoke(app, ["plan", "--target", "nope"])
    assert bad.exit_code == 2 and "unknown model shape 'nope'" in bad.output
