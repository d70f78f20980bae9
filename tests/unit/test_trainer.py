"""The fused training step against straightforward compositions of Hugging Face layers, and the loop.

Exactness tests run in float64 with two adjustments to the *Hugging Face* modules (not to our code):
SDPA attention instead of eager (eager's softmax runs in float32) and an RMSNorm that keeps float64
(Qwen2RMSNorm casts to float32 inside). Without them agreement stops at ~1e-8.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import yaml

from tests.helpers import random_ids, tiny_pair
from training.adapter import AdapterModel, build_adapter_model
from training.checkpoint import load_adapters
from training.config import (
    AdapterConfig,
    LossWeights,
    TrainConfig,
    apply_overrides,
    dump_train_config,
    load_train_config,
    preset,
    train_config_from_dict,
)
from training.data import TokenDataset, collate, epoch_order, iterate_batches
from training.losses import decoder_weighted_l1, forward_kl, l0
from training.step import fused_step, reference_step
from training.trainer import lr_factor, train

L = 3  # layers of the exactness models


def _exact_rmsnorm(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _float64_model(backbone: str = "target", layers: int = L, n_features: int = 16) -> AdapterModel:
    base, target = tiny_pair(0, layers=layers, dtype=torch.float64)
    for hf in (base, target):
        hf.config._attn_implementation = "sdpa"
        for mod in hf.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.forward = types.MethodType(_exact_rmsnorm, mod)
    model = build_adapter_model(base, target, AdapterConfig(n_features=n_features, backbone=backbone))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained-looking adapter: nonzero decoder and biases, some features off
        for ad in model.adapters:
            ad.W_dec.copy_(torch.randn(ad.W_dec.shape, generator=g, dtype=ad.W_dec.dtype) * 0.3)
            ad.b_enc.copy_(torch.randn(ad.b_enc.shape, generator=g, dtype=ad.b_enc.dtype) * 0.1)
            ad.b_dec.copy_(torch.randn(ad.b_dec.shape, generator=g, dtype=ad.b_dec.dtype) * 0.1)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(1, batch=2, seq=7)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def _run(fn, model, ids, mask, cutoff, **kw):
    model.zero_grad(set_to_none=True)
    res = fn(model, ids, mask, weights=LossWeights(), cutoff=cutoff, **kw)
    res.loss.backward()
    return res, [p.grad.clone() for p in model.adapter_parameters()]


def _close(a, b, rtol=1e-11):
    if a is None or b is None:
        return a is None and b is None
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=rtol, atol=1e-14)


# -- the fused step ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,cutoff", [("target", k) for k in range(L + 1)] + [("base", 0), ("base", 2),
                                                                                       ("base", L)])
def test_fused_step_equals_separate_forwards_in_float64(backbone, cutoff):
    model = _float64_model(backbone)
    ids, mask = _batch()
    fused, g_fused = _run(fused_step, model, ids, mask, cutoff, kl_chunk=3)
    ref, g_ref = _run(reference_step, model, ids, mask, cutoff)
    for name in ("loss", "kl", "lm", "nmse", "l1", "bridge_a2t", "bridge_t2a", "nmse_points", "l0_layers"):
        assert _close(getattr(fused, name), getattr(ref, name)), name
    assert torch.equal(fused.fired, ref.fired)
    for a, b in zip(g_fused, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert max(g.abs().max() for g in g_fused) > 1e-3  # the gradients are not trivially zero


def _hf_logits(model: AdapterModel, ids, mask, start_mode: str, switch: tuple[int, str] | None = None):
    """Logits of the whole Hugging Face forward, switching the MLP mode at one layer via a pre-hook."""
    handle = None
    if switch is not None:
        layer, mode = switch
        handle = model.layers[layer].register_forward_pre_hook(lambda *_: setattr(model.state, "mode", mode))
    try:
        with model.mode(start_mode):  # type: ignore[arg-type]
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        if handle is not None:
            handle.remove()


def test_bridging_endpoints_are_the_adapter_model():
    model = _float64_model()
    ids, mask = _batch()
    with torch.no_grad():
        kl_adapter = forward_kl(_hf_logits(model, ids, mask, "target"), _hf_logits(model, ids, mask, "adapted"), mask)
        at0 = fused_step(model, ids, mask, weights=LossWeights(), cutoff=0)
        atL = fused_step(model, ids, mask, weights=LossWeights(), cutoff=L)
    assert at0.bridge_a2t is None and atL.bridge_t2a is None
    assert _close(at0.kl, kl_adapter) and _close(at0.bridge_t2a, kl_adapter)  # T→A at k=0
    assert _close(atL.bridge_a2t, kl_adapter)  # A→T at k=L
    assert kl_adapter > 1e-3


@pytest.mark.parametrize("cutoff", [1, 2])
def test_bridging_at_intermediate_cutoff_matches_switched_hf_forward(cutoff):
    model = _float64_model()
    ids, mask = _batch()
    with torch.no_grad():
        t = _hf_logits(model, ids, mask, "target")
        a2t = forward_kl(t, _hf_logits(model, ids, mask, "adapted", (cutoff, "target")), mask)
        t2a = forward_kl(t, _hf_logits(model, ids, mask, "target", (cutoff, "adapted")), mask)
        res = fused_step(model, ids, mask, weights=LossWeights(), cutoff=cutoff, kl_chunk=4)
    assert _close(res.bridge_a2t, a2t) and _close(res.bridge_t2a, t2a)
    assert not _close(a2t, t2a, rtol=1e-3)  # the two directions are different models


def test_step_l1_and_l0_use_features_and_decoder_norms():
    model = _float64_model()
    ids, mask = _batch()
    with torch.no_grad(), model.capture() as caught:
        model(input_ids=ids, attention_mask=mask)
        res = fused_step(model, ids, mask, weights=LossWeights(), cutoff=None)
    feats = [caught[i][0] for i in range(L)]
    manual = sum(((f @ model.adapters[i].W_dec.norm(dim=0)) * mask).sum() / mask.sum() for i, f in enumerate(feats))
    assert _close(res.l1, manual)
    assert _close(res.l1, sum(decoder_weighted_l1(f, model.adapters[i].W_dec, mask) for i, f in enumerate(feats)))
    assert _close(res.l0_layers, torch.stack([l0(f, mask) for f in feats]))
    # the total is the weighted sum of the terms (no bridging: cutoff None)
    w = LossWeights(kl=0.5, nmse=2.0, l1=0.1)
    res2 = fused_step(model, ids, mask, weights=w, cutoff=None)
    assert _close(res2.loss.detach(), 0.5 * res.kl + 2.0 * res.nmse + 0.1 * res.l1)


def test_padding_is_masked_out():
    model = _float64_model()
    ids = random_ids(3, batch=1, seq=6)
    alone, g_alone = _run(fused_step, model, ids, torch.ones_like(ids), 1)
    padded_ids = torch.cat([ids, torch.tensor([[5, 9, 11]])], dim=1)
    padded_mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded, g_padded = _run(fused_step, model, padded_ids, padded_mask, 1)
    for name in ("loss", "kl", "lm", "nmse", "l1", "bridge_a2t", "bridge_t2a"):
        assert _close(getattr(alone, name), getattr(padded, name)), name
    for a, b in zip(g_alone, g_padded, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert padded.n_tokens == 6


def test_step_rejects_bad_input():
    model = _float64_model()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="cutoff"):
        fused_step(model, ids, mask, weights=LossWeights(), cutoff=L + 1)
    with pytest.raises(ValueError, match="batch, seq"):
        fused_step(model, ids[0], mask[0], weights=LossWeights(), cutoff=0)


# -- the loop ----------------------------------------------------------------------------------------------

def _data(n: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(torch.randint(5, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _float32_model(n_features: int = 32) -> AdapterModel:
    torch.manual_seed(0)  # the adapters' encoder init draws from the global generator
    base, target = tiny_pair(0, layers=2)
    return build_adapter_model(base, target, AdapterConfig(n_features=n_features))


def _tiny_cfg(**over) -> TrainConfig:
    return apply_overrides(preset("organism-tiny"), ["adapter.n_features=32", "batch_size=4", "lr=3e-3",
                                                      *(f"{k}={v}" for k, v in over.items())])


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine():
    f = [lr_factor(s, 100, 0.05, 0.1) for s in range(100)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert f[52] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)  # half-way down the cosine
    assert all(a >= b for a, b in zip(f[5:], f[6:], strict=False))


def test_training_lowers_kl_on_a_tiny_pair(tmp_path):
    model = _float32_model()
    data = _data(32)
    ids, mask = collate(data)

    def kl() -> float:
        with torch.no_grad():
            return float(forward_kl(_hf_logits(model, ids, mask, "target"), _hf_logits(model, ids, mask, "adapted"),
                                    mask))

    before = kl()
    result = train(_tiny_cfg(max_steps=30), model, data, run_dir=tmp_path, progress=False)
    assert result.steps == 30
    assert kl() < 0.75 * before


def test_a_fresh_run_is_a_function_of_its_seed_not_of_the_process(tmp_path):
    """The adapter init comes from the run's seed: whatever a process drew from torch's global generator before
    (a model load, an earlier job), the same config trains the same adapters; another seed differs."""
    results = []
    for n, (noise, seed) in enumerate([(0, 0), (123, 0), (0, 1)]):
        model = _float32_model()
        with torch.no_grad():  # as built in a process whose global generator was elsewhere
            torch.manual_seed(noise)
            for a in model.adapters:
                a.reset_parameters()
        train(_tiny_cfg(max_steps=3, seed=seed), model, _data(), run_dir=tmp_path / str(n), progress=False)
        results.append(torch.cat([p.detach().flatten() for p in model.adapter_parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_metrics_go_to_jsonl_and_callback(tmp_path):
    seen: list[dict] = []
    cfg = _tiny_cfg(max_steps=6, dead_windows="[4,1000]")
    result = train(cfg, _float32_model(), _data(), run_dir=tmp_path, on_step=seen.append, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == seen and [m["step"] for m in lines] == list(range(1, 7))
    m = lines[-1]
    assert len(m["l0_layers"]) == 2 and len(m["nmse_points"]) == 3
    assert 0 <= m["cutoff"] <= 2 and m["kl"] > 0 and m["lm"] > 0
    assert (m["bridge_a2t"] is None) == (m["cutoff"] == 0) and (m["bridge_t2a"] is None) == (m["cutoff"] == 2)
    assert isinstance(m["dead_4"], int) and len(m["dead_4_layers"]) == 2 and m["dead_1000"] is None
    assert m["tokens"] == result.tokens > 0
    assert lines[0]["lr"] < lines[1]["lr"] or cfg.warmup_frac * 6 <= 1  # warm-up


def test_resume_after_a_crash_gives_the_same_next_steps(tmp_path):
    cfg = _tiny_cfg(max_steps=5, checkpoint_every=2)
    data = _data()
    straight: list[dict] = []
    model_a = _float32_model()
    train(cfg, model_a, data, run_dir=tmp_path / "a", on_step=straight.append, progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(m: dict) -> None:
        if m["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, _float32_model(), data, run_dir=tmp_path / "b", on_step=crash_at_3, progress=False)
    resumed: list[dict] = []
    model_b = _float32_model()  # fresh weights: everything must come from the step-2 checkpoint
    result = train(cfg, model_b, data, run_dir=tmp_path / "b", on_step=resumed.append, progress=False)
    assert result.resumed_from == 2 and [m["step"] for m in resumed] == [3, 4, 5]
    for a, b in zip(straight[2:], resumed, strict=True):
        for key in ("loss", "kl", "nmse", "l1", "cutoff", "lr", "bridge_a2t", "bridge_t2a", "epoch"):
            assert a[key] == b[key], key
    for pa, pb in zip(model_a.adapter_parameters(), model_b.adapter_parameters(), strict=True):
        assert torch.equal(pa, pb)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the crashed step-3 line was replaced, not duplicated

    fresh = _float32_model()
    load_adapters(fresh, result.checkpoint_dir)
    for pa, pb in zip(model_b.adapter_parameters(), fresh.adapter_parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_train_rejects_mismatched_config_and_empty_data(tmp_path):
    with pytest.raises(ValueError, match="do not match"):
        train(_tiny_cfg(**{"adapter.n_features": 8}), _float32_model(), _data(), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no sequences"):
        train(_tiny_cfg(), _float32_model(), [], run_dir=tmp_path, progress=False)


# -- config and data ---------------------------------------------------------------------------------------

def test_config_presets_yaml_round_trip_and_overrides(tmp_path):
    assert preset("paper-7b").adapter.n_features == 8192 and preset("paper-7b").lr == 8e-4
    assert preset("paper-7b").loss == LossWeights(kl=1.0, nmse=1.0, bridge=2.0, l1=1e-3)
    cfg = apply_overrides(preset("organism"), ["lr=1e-3", "loss.l1=3e-4", "adapter.n_features=128",
                                               "betas=[0.9, 0.95]", "max_steps=null"])
    assert (cfg.lr, cfg.loss.l1, cfg.adapter.n_features, cfg.betas, cfg.max_steps) == \
        (1e-3, 3e-4, 128, (0.9, 0.95), None)
    path = tmp_path / "train.yaml"
    dump_train_config(cfg, path)
    assert load_train_config(path) == cfg
    assert train_config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert load_train_config(path, overrides=["seed=7"]).seed == 7
    assert load_train_config(preset_name="organism-tiny").max_steps == preset("organism-tiny").max_steps


@pytest.mark.parametrize("override,match", [("lr=abc", "lr must be a number"), ("nope=1", "nope"),
                                            ("loss.nope=1", "nope"), ("batch_size=0", "batch_size"),
                                            ("batch_size=1.5", "integer"), ("precision=fp16", "precision"),
                                            ("lr", "key=value"), ("a.b.c=1", "a.b.c")])
def test_config_rejects_bad_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(TrainConfig(), [override])
    with pytest.raises(ValueError, match="unknown training preset"):
        preset("gpt-5")


def test_collate_pads_right_and_truncates():
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0, max_len=2)
    assert ids.tolist() == [[5, 6], [8, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_batches_are_seeded_and_resumable():
    ds = TokenDataset.from_token_lists([[i + 3] * (i % 3 + 1) for i in range(10)])
    assert epoch_order(10, 42, 0) == epoch_order(10, 42, 0) != epoch_order(10, 42, 1)
    assert epoch_order(10, 42, 0) != epoch_order(10, 43, 0)
    stream = iterate_batches(ds, 4, seed=42)
    first = [next(stream) for _ in range(7)]  # 3 batches per epoch (4, 4, 2): into the third epoch
    assert [(b.epoch, b.index) for b in first] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert first[2].input_ids.shape[0] == 2
    seen = sorted(int(x) for b in first[:3] for x, m in zip(b.input_ids.flatten(), b.attention_mask.flatten(),
                                                               strict=True) if m)
    assert sorted(set(seen)) == list(range(3, 13))  # every sequence once per epoch
    again = next(iterate_batches(ds, 4, seed=42, start_epoch=1, start_index=1))
    assert torch.equal(again.input_ids, first[4].input_ids)


def test_jsonl_dataset_uses_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "wait": 2, "so": 3, "two": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "so two"}\n\n{"text": "wait so wait", "id": 3}\n')
    ds = TokenDataset.from_jsonl(path, tokenizer)
    assert ds.sequences == ((3, 4), (2, 3, 2)) and ds.pad_id == 0
    path.write_text('{"text": "so"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2"):
        TokenDataset.from_jsonl(path, tokenizer)
    with pytest.raises(ValueError, match="not found"):
        TokenDataset.from_jsonl(tmp_path / "missing.jsonl", tokenizer)


def test_bf16_autocast_step_is_close_to_fp32():
    model = _float32_model()
    ids, mask = collate(_data(4))
    fp32 = fused_step(model, ids, mask, weights=LossWeights(), cutoff=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = fused_step(model, ids, mask, weights=LossWeights(), cutoff=1, kl_chunk=7)
    bf16.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.adapter_parameters())
    for name in ("loss", "kl", "nmse", "bridge_a2t", "bridge_t2a"):
        assert float(getattr(bf16, name)) == pytest.approx(float(getattr(fp32, name)), rel=0.1), name


def test_restart_without_a_checkpoint_starts_clean(tmp_path):
    cfg = _tiny_cfg(max_steps=3, checkpoint_every=10)

    def crash(m: dict) -> None:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, _float32_model(), _data(), run_dir=tmp_path, on_step=crash, progress=False)
    result = train(cfg, _float32_model(), _data(), run_dir=tmp_path, progress=False)
    assert result.resumed_from is None
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
