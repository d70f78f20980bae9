"""Training precision: what ``auto`` resolves to, the fp32 attention inside a bf16 autocast, and bf16
training that learns as fp32 does (the organism's build and the adapter trainer)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from tests.helpers import random_ids, tiny_pair, tiny_qwen2
from training.adapter import build_adapter_model
from training.config import AdapterConfig, apply_overrides, preset
from training.organism.build import _encode, _model_config, _train, get_preset
from training.organism.tasks import FAMILIES, corpus, make_splits
from training.organism.tokenizer import train_tokenizer
from training.precision import SDPA_FP32, fp32_attention, native_bf16, resolve_precision
from training.trainer import train


def test_resolve_precision():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve_precision("auto", "meta") == "fp32"
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        resolve_precision("fp16")


@pytest.mark.parametrize(("machine", "avx512_bf16", "amx", "expected"), [
    ("x86_64", True, False, True), ("x86_64", False, True, True),
    ("x86_64", False, False, False),  # AVX-512 without BF16 (Skylake to Ice Lake): oneDNN says yes, it emulates
])
def test_native_bf16_on_x86_needs_avx512_bf16_or_amx(monkeypatch, machine, avx512_bf16, amx, expected):
    monkeypatch.setattr("training.precision.platform.machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert native_bf16("cpu") is expected
    assert resolve_precision("auto") == ("bf16" if expected else "fp32")


def test_fp32_attention_is_exact_on_right_padded_batches_and_skips_sliding_windows():
    """It builds no mask (see training/precision.py): right padding, as training pads, must give the same logits
    at the real positions; a model with sliding windows keeps its own attention."""
    model = tiny_qwen2(0, layers=2)
    model.set_attn_implementation("sdpa")
    ids = random_ids(3, batch=2, seq=9)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with fp32_attention(model):
            ours = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours[0, :5], plain[0, :5], atol=1e-5)
    assert torch.allclose(ours[1], plain[1], atol=1e-5)
    model.config.sliding_window, model.config.use_sliding_window = 4, True
    with fp32_attention(model):
        assert model.config._attn_implementation == "sdpa"


def _attention_input_dtypes(model, ids) -> set[torch.dtype]:
    """The dtypes reaching each layer's o_proj: the attention's own output, before the bf16 product."""
    seen: set[torch.dtype] = set()
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
             for layer in model.model.layers]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_fp32_attention_inside_bf16_autocast_and_restored():
    model = tiny_qwen2(0, layers=2)
    model.set_attn_implementation("sdpa")
    ids = random_ids(0)
    assert _attention_input_dtypes(model, ids) == {torch.bfloat16}
    with fp32_attention(model):
        assert model.config._attn_implementation == SDPA_FP32
        assert _attention_input_dtypes(model, ids) == {torch.float32}
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), fp32_attention(model):
        raise RuntimeError("a failed step")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")  # other implementations are left as they are
    with fp32_attention(model):
        assert model.config._attn_implementation == "eager"
    with fp32_attention(tiny_qwen2(0, layers=1), enabled=False) as nothing:
        assert nothing is None


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no native bf16: the builds run fp32")
def test_organism_training_in_bf16_learns_as_fp32_does():
    """Autocast around the whole step (backward and AdamW too) left the organism's loss near its start; the
    build's bf16 forward must follow the fp32 curve."""
    cfg = get_preset("organism-tiny")
    tokenizer = train_tokenizer(corpus(0), vocab_size=cfg.vocab_size)
    splits = make_splits(0, 8, FAMILIES)
    problems = [p for s in splits.values() for p in s.train[:64]]
    enc = _encode(tokenizer, problems, dict(cfg.family_weights), reasoning=True)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(_model_config(cfg, tokenizer))
        losses[bf16] = _train(model, enc, steps=40, lr=3e-3, preset=cfg, seed=0, pad_id=tokenizer.pad_token_id,
                              desc="t", progress=False, on_step=None, bf16=bf16)
        assert model.config._attn_implementation == "sdpa"  # restored for saving and generation
    assert losses[False][-1] < 0.6 * losses[False][0]
    assert losses[True][-1] == pytest.approx(losses[False][-1], rel=0.05)


def test_adapter_training_in_bf16_runs_attention_in_fp32_and_learns(tmp_path):
    results, during = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        base, target = tiny_pair(0, layers=2)
        for hf in (base, target):
            hf.set_attn_implementation("sdpa")
        model = build_adapter_model(base, target, AdapterConfig(n_features=32))
        cfg = apply_overrides(preset("organism-tiny"), ["adapter.n_features=32", "batch_size=4", "lr=3e-3",
                                                        "max_steps=12", f"precision={precision}"])
        data = [random_ids(i, batch=1, seq=10)[0].tolist() for i in range(24)]
        seen = during[precision] = set()
        results[precision] = train(cfg, model, data, run_dir=tmp_path / precision, progress=False,
                                   on_step=lambda _m, s=seen, m=model: s.add(m.hf.config._attn_implementation)).final
        assert model.hf.config._attn_implementation == "sdpa"
    assert during == {"fp32": {"sdpa"}, "bf16": {SDPA_FP32}}
    assert results["bf16"]["kl"] == pytest.approx(results["fp32"]["kl"], rel=0.1)
