"""Checkpoints: our adapters-only format and the paper's full-model format, round trips and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import random_ids, tiny_adapter_model, tiny_pair
from training.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTERS_FILE,
    REFERENCE_INDEX_FILE,
    REFERENCE_SINGLE_FILE,
    adapter_config_from_dict,
    is_reference_checkpoint,
    load_adapters,
    load_reference_checkpoint,
    parse_size,
    read_adapter_config,
    reference_weight_map,
    save_adapters,
    save_reference_checkpoint,
)
from training.config import AdapterConfig

F = 16


def logits(model, ids, mode="adapted"):
    with torch.no_grad(), model.mode(mode):
        return model(ids).logits


# -- our format -------------------------------------------------------------------------------------

def test_our_format_round_trip(tmp_path):
    trained = tiny_adapter_model(0, F)
    out = save_adapters(trained, tmp_path / "ckpt", base_name="org/base", target_name="org/target",
                        extra={"step": 7})
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTERS_FILE]
    with safe_open(str(out / ADAPTERS_FILE), framework="pt") as fh:
        names = set(fh.keys())
        assert tuple(fh.get_tensor("layers.1.W_dec").shape) == (32, F)
    assert names == {f"layers.{i}.{w}" for i in range(2) for w in ("W_enc", "b_enc", "W_dec", "b_dec")}
    meta = read_adapter_config(out)
    assert meta["base_model"] == "org/base" and meta["target_model"] == "org/target"
    assert (meta["n_features"], meta["dec_bias"], meta["backbone"]) == (F, True, "target")
    assert (meta["d_model"], meta["n_layers"], meta["dtype"], meta["extra"]) == (32, 2, "float32", {"step": 7})
    assert adapter_config_from_dict(meta) == AdapterConfig(n_features=F)

    fresh = tiny_adapter_model(0, F, trained=False)
    ids = random_ids(0)
    assert not torch.equal(logits(fresh, ids), logits(trained, ids))
    assert load_adapters(fresh, out) is fresh
    assert torch.equal(logits(fresh, ids), logits(trained, ids))


def test_our_format_without_decoder_bias(tmp_path):
    trained = tiny_adapter_model(0, F, dec_bias=False)
    save_adapters(trained, tmp_path, base_name="b", target_name="t")
    fresh = tiny_adapter_model(0, F, trained=False, dec_bias=False)
    load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh, random_ids(1)), logits(trained, random_ids(1)))
    with pytest.raises(ValueError, match="dec_bias"):
        load_adapters(tiny_adapter_model(0, F, trained=False), tmp_path)


def test_loading_casts_to_the_model_dtype(tmp_path):
    save_adapters(tiny_adapter_model(0, F), tmp_path, base_name="b", target_name="t")
    fresh = tiny_adapter_model(0, F, trained=False)
    fresh.to(torch.bfloat16)
    load_adapters(fresh, tmp_path)
    assert fresh.adapters[0].W_dec.dtype == torch.bfloat16 and fresh.adapters[0].W_dec.any()


def test_config_mismatch_is_a_value_error(tmp_path):
    save_adapters(tiny_adapter_model(0, F), tmp_path, base_name="b", target_name="t")
    with pytest.raises(ValueError, match="n_features: checkpoint 16, model 8"):
        load_adapters(tiny_adapter_model(0, 8, trained=False), tmp_path)
    with pytest.raises(ValueError, match="backbone"):
        load_adapters(tiny_adapter_model(0, F, trained=False, backbone="base"), tmp_path)


def test_shape_mismatch_is_a_value_error(tmp_path):
    save_adapters(tiny_adapter_model(0, F), tmp_path, base_name="b", target_name="t")
    file = tmp_path / ADAPTERS_FILE
    with safe_open(str(file), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["layers.1.W_enc"] = tensors["layers.1.W_enc"][:, :31].contiguous()
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"layers\.1\.W_enc has shape \(16, 31\)"):
        load_adapters(tiny_adapter_model(0, F, trained=False), tmp_path)
    del tensors["layers.1.W_enc"]
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"missing layers\.1\.W_enc"):
        load_adapters(tiny_adapter_model(0, F, trained=False), tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an adapter checkpoint"):
        read_adapter_config(tmp_path)
    assert not is_reference_checkpoint(tmp_path)


# -- the reference format ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    return tiny_adapter_model(0, F)


def test_reference_round_trip_single_file(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", REFERENCE_SINGLE_FILE]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLMWithTranscoder"] and config["model_type"] == "qwen2"
    assert (config["transcoder_n_features"], config["transcoder_dec_bias"]) == (F, True)
    assert "auto_map" not in config
    names = set(reference_weight_map(tmp_path))
    assert "model.layers.1.mlp.transcoder_dec.bias" in names and "model.layers.0.mlp.gate_proj.weight" in names
    assert not any("base_mlp" in n or "target_mlp" in n or "adapter" in n for n in names)
    with safe_open(str(tmp_path / REFERENCE_SINGLE_FILE), framework="pt") as fh:
        assert tuple(fh.get_tensor("model.layers.0.mlp.transcoder_enc.weight").shape) == (F, 32)
        assert tuple(fh.get_tensor("model.layers.0.mlp.transcoder_dec.weight").shape) == (32, F)
        base, _ = tiny_pair(0)  # the MLP stored is the base's
        assert torch.equal(fh.get_tensor("model.layers.1.mlp.up_proj.weight"), base.model.layers[1].mlp.up_proj.weight)

    loaded = load_reference_checkpoint(tmp_path, attn_implementation="eager")
    ids = random_ids(2)
    assert torch.equal(logits(loaded, ids), logits(trained, ids))
    assert torch.equal(logits(loaded, ids, "hybrid"), logits(trained, ids, "hybrid"))
    assert all(mlp.target_mlp is None for mlp in loaded.mlps)
    with pytest.raises(RuntimeError, match="target mode"):
        logits(loaded, ids, "target")
    assert {id(p) for p in loaded.parameters() if p.requires_grad} == {id(p) for p in loaded.adapter_parameters()}


def test_reference_sharded_round_trip_follows_the_weight_map(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path, max_shard_size="6KB")
    index = json.loads((tmp_path / REFERENCE_INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / REFERENCE_SINGLE_FILE).exists()
    files_of_layer0 = {f for n, f in index["weight_map"].items() if n.startswith("model.layers.0.")}
    assert len(files_of_layer0) > 1  # a layer cut across shards, as in the released 7B files
    total = sum(t.numel() * t.element_size() for t in trained.hf.state_dict().values())
    assert 0 < index["metadata"]["total_size"] < total  # target MLPs are not stored
    loaded = load_reference_checkpoint(tmp_path, attn_implementation="eager")
    ids = random_ids(3)
    assert torch.equal(logits(loaded, ids), logits(trained, ids))


def test_resaving_replaces_old_shards(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path, max_shard_size="6KB")
    save_reference_checkpoint(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", REFERENCE_SINGLE_FILE]


def test_reference_with_target_enables_target_mode(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path)
    _, target = tiny_pair(0)
    loaded = load_reference_checkpoint(tmp_path, target=target, attn_implementation="eager")
    _, fresh_target = tiny_pair(0)
    ids = random_ids(4)
    assert torch.equal(logits(loaded, ids, "target"), fresh_target(ids).logits)
    assert torch.equal(logits(loaded, ids), logits(trained, ids))


def test_reference_dtype_is_kept_or_cast(trained, tmp_path):
    model = tiny_adapter_model(0, F)
    model.to(torch.bfloat16)
    save_reference_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    kept = load_reference_checkpoint(tmp_path)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    cast = load_reference_checkpoint(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}


def test_plain_transformers_drops_the_adapters_silently(trained, tmp_path):
    """The trap in the released format: from_pretrained reads it as a plain Qwen2 = our hybrid."""
    from transformers import Qwen2ForCausalLM

    save_reference_checkpoint(trained, tmp_path, max_shard_size="6KB")
    plain = Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = random_ids(5)
    assert torch.equal(plain(ids).logits, logits(trained, ids, "hybrid"))


def _rewrite_single_file(path, drop):
    with safe_open(str(path / REFERENCE_SINGLE_FILE), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if not drop(k)}
    save_file(tensors, str(path / REFERENCE_SINGLE_FILE), metadata={"format": "pt"})


def test_missing_transcoder_tensors_are_an_error(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path)
    _rewrite_single_file(tmp_path, lambda name: "transcoder" in name)
    with pytest.raises(ValueError, match=r"lacks transcoder tensors \(model\.layers\.0\.mlp\.transcoder_enc"):
        load_reference_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="lacks transcoder tensors"):
        load_adapters(tiny_adapter_model(0, F, trained=False), tmp_path)


def test_missing_transcoder_tensors_in_one_shard_are_an_error(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path, max_shard_size="6KB")
    index = json.loads((tmp_path / REFERENCE_INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.transcoder_dec.bias"]
    (tmp_path / REFERENCE_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.transcoder_dec\.bias"):
        load_reference_checkpoint(tmp_path)


def test_missing_model_tensor_or_shard_is_an_error(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path, max_shard_size="6KB")
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load_reference_checkpoint(tmp_path)
    save_reference_checkpoint(trained, tmp_path)
    _rewrite_single_file(tmp_path, lambda name: name == "model.norm.weight")
    with pytest.raises(ValueError, match=r"lacks model tensors: model\.norm\.weight"):
        load_reference_checkpoint(tmp_path)


def test_reference_shape_mismatch_is_a_value_error(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["transcoder_n_features"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers\.0\.W_enc has shape \(16, 32\), the model expects \(8, 32\)"):
        load_reference_checkpoint(tmp_path)


def test_load_adapters_reads_the_transcoders_of_a_reference_checkpoint(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path, max_shard_size="6KB")
    meta = read_adapter_config(tmp_path)
    assert (meta["format"], meta["n_features"], meta["dec_bias"], meta["n_layers"]) == ("reference", F, True, 2)
    fresh = tiny_adapter_model(0, F, trained=False)
    load_adapters(fresh, tmp_path)
    ids = random_ids(6)
    assert torch.equal(logits(fresh, ids), logits(trained, ids))
    with pytest.raises(ValueError, match="n_features"):
        load_adapters(tiny_adapter_model(0, 8, trained=False), tmp_path)


def test_base_backbone_cannot_be_saved_in_the_reference_format(tmp_path):
    with pytest.raises(ValueError, match="backbone='base'"):
        save_reference_checkpoint(tiny_adapter_model(0, F, backbone="base"), tmp_path)


def test_reference_without_decoder_bias(tmp_path):
    model = tiny_adapter_model(0, F, dec_bias=False)
    save_reference_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["transcoder_dec_bias"] is False
    loaded = load_reference_checkpoint(tmp_path, attn_implementation="eager")
    assert all(ad.b_dec is None for ad in loaded.adapters)
    assert torch.equal(logits(loaded, random_ids(7)), logits(model, random_ids(7)))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size(100) == 100
    assert parse_size("1.5 MB") == 1_500_000
    for bad in ("five gigs", 0, "-3KB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def _write_released_style_checkpoint(path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint written by hand the way the paper's release is laid out, not by our writer.

    transformers-4.x config keys (``rope_theta``, ``torch_dtype``, no ``rope_parameters``), bfloat16
    tensors, target non-MLP + base MLP + transcoder tensors, two shards split inside layer 0.
    Returns the tensors (float32 copies of the stored bf16 values).
    """
    base, target = tiny_pair(seed)
    tensors = {n: t for n, t in target.state_dict().items() if ".mlp." not in n}
    tensors.update({n: t for n, t in base.state_dict().items() if ".mlp." in n})
    g = torch.Generator().manual_seed(seed)
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        tensors[p + "transcoder_enc.weight"] = torch.rand(F, 32, generator=g) * 0.35 - 0.175
        tensors[p + "transcoder_enc.bias"] = torch.randn(F, generator=g) * 0.1
        tensors[p + "transcoder_dec.weight"] = torch.randn(32, F, generator=g) * 0.3
        tensors[p + "transcoder_dec.bias"] = torch.randn(32, generator=g) * 0.1
    tensors = {n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items()}
    names = sorted(tensors)
    first = [n for n in names if not n.startswith("model.layers.0.mlp.transcoder_dec")][: len(names) // 2]
    first += ["model.layers.0.mlp.transcoder_enc.weight"]  # layer 0's encoder here, its decoder in shard 2
    shard1 = {n: tensors[n] for n in first}
    shard2 = {n: t for n, t in tensors.items() if n not in shard1}
    path.mkdir(parents=True, exist_ok=True)
    save_file(shard1, str(path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(shard2, str(path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in shard1}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in shard2})
    (path / REFERENCE_INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLMWithTranscoder"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 64, "max_position_embeddings": 256, "max_window_layers": 2, "model_type": "qwen2",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 500.0, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.3", "use_cache": True, "use_sliding_window": False, "vocab_size": 64,
        "transcoder_n_features": F, "transcoder_dec_bias": True,
    }))
    return {n: t.float() for n, t in tensors.items()}


def test_released_style_checkpoint_loads_and_computes_the_paper_forward(tmp_path):
    tensors = _write_released_style_checkpoint(tmp_path / "release")
    loaded = load_reference_checkpoint(tmp_path / "release", dtype=torch.float32, attn_implementation="eager")
    assert loaded.config.rope_parameters["rope_theta"] == 500.0  # the legacy key is honoured
    meta = read_adapter_config(tmp_path / "release")
    assert (meta["dtype"], meta["n_features"]) == ("bfloat16", F)

    # Hand-built reference: a plain Qwen2 with the same weights, each MLP plus W_dec ReLU(W_enc x + b_enc) + b_dec.
    from transformers import Qwen2ForCausalLM

    hand = Qwen2ForCausalLM(loaded.config).eval()
    hand.load_state_dict({n: t for n, t in tensors.items() if "transcoder" not in n})
    for i, layer in enumerate(hand.model.layers):
        p = f"model.layers.{i}.mlp.transcoder_"
        enc_w, enc_b, dec_w, dec_b = (tensors[p + s] for s in ("enc.weight", "enc.bias", "dec.weight", "dec.bias"))
        layer.mlp.register_forward_hook(
            lambda mod, args, out, ew=enc_w, eb=enc_b, dw=dec_w, db=dec_b:
                out + torch.relu(args[0] @ ew.T + eb) @ dw.T + db)
    ids = random_ids(8)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), hand(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(loaded.adapters[1].W_dec, tensors["model.layers.1.mlp.transcoder_dec.weight"])


def test_reference_model_tensor_shape_mismatch_is_a_value_error(trained, tmp_path):
    save_reference_checkpoint(trained, tmp_path)
    with safe_open(str(tmp_path / REFERENCE_SINGLE_FILE), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:31].contiguous()
    save_file(tensors, str(tmp_path / REFERENCE_SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(31,\), its config.json implies \(32,\)"):
        load_reference_checkpoint(tmp_path)
