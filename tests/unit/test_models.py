"""Model loading: local directories, the offline Hub cache, clear errors, supported architectures."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_ids, randomize_adapters, tiny_llama, tiny_pair
from training.checkpoint import save_adapters, save_reference_checkpoint
from training.config import AdapterConfig
from training.models import (
    ModelNotFoundError,
    load_adapter_model,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
)

F = 16


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """(base dir, target dir) holding tiny_pair(0) saved with save_pretrained."""
    root = tmp_path_factory.mktemp("pair")
    base, target = tiny_pair(0)
    base.save_pretrained(root / "base")
    target.save_pretrained(root / "target")
    return root / "base", root / "target"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu-please'"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_causal_lm_from_a_local_directory(pair_dirs):
    _, target_dir = pair_dirs
    model = load_causal_lm(str(target_dir), attn_implementation="eager")
    _, fresh = tiny_pair(0)
    ids = random_ids(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_load_causal_lm_casts_dtype(pair_dirs):
    model = load_causal_lm(str(pair_dirs[0]), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_local_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model") as err:
        load_causal_lm(str(missing))
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_missing_hub_id_offline_names_the_id_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        load_causal_lm("adapterlens-tests/does-not-exist")
    message = str(err.value)
    assert "adapterlens-tests/does-not-exist" in message and "hub-cache" in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelNotFoundError, match="tokenizer 'adapterlens-tests/does-not-exist'"):
        load_tokenizer("adapterlens-tests/does-not-exist")


def test_reference_checkpoints_are_refused_as_plain_models(tmp_path):
    base, target = tiny_pair(0)
    from training.adapter import build_adapter_model

    save_reference_checkpoint(build_adapter_model(base, target, AdapterConfig(n_features=F)), tmp_path)
    with pytest.raises(ValueError, match="load_reference_checkpoint"):
        load_causal_lm(str(tmp_path))


def test_unsupported_architecture_is_a_type_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path)
    with pytest.raises(TypeError, match="unsupported model GPT2LMHeadModel"):
        load_causal_lm(str(tmp_path))


def test_load_tokenizer_from_a_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok("hello world")["input_ids"] == [3, 4]
    with pytest.raises(ModelNotFoundError, match="missing-tok"):
        load_tokenizer(str(tmp_path / "missing-tok"))


def test_load_adapter_model_with_and_without_adapters(pair_dirs, tmp_path):
    base_dir, target_dir = pair_dirs
    cfg = AdapterConfig(n_features=F)
    fresh = load_adapter_model(str(base_dir), str(target_dir), cfg)
    ids = random_ids(1)
    with torch.no_grad():
        adapted = fresh(ids).logits
        with fresh.mode("hybrid"):
            assert torch.equal(adapted, fresh(ids).logits)  # silent init
    randomize_adapters(fresh, seed=3)
    save_adapters(fresh, tmp_path, base_name=str(base_dir), target_name=str(target_dir))
    loaded = load_adapter_model(str(base_dir), str(target_dir), cfg, adapters_path=str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fresh(ids).logits)
        with loaded.mode("target"):
            _, target = tiny_pair(0)
            torch.testing.assert_close(loaded(ids).logits, target(ids).logits, rtol=0, atol=1e-5)


def test_llama_pair_loads_as_an_adapter_model(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    tiny_llama(1).save_pretrained(tmp_path / "target")
    model = load_adapter_model(str(tmp_path / "base"), str(tmp_path / "target"), AdapterConfig(n_features=F))
    randomize_adapters(model)
    ids = random_ids(2)
    with torch.no_grad():
        adapted = model(ids).logits
        with model.mode("hybrid"):
            hybrid = model(ids).logits
        with model.mode("target"):
            torch.testing.assert_close(model(ids).logits, tiny_llama(1)(ids).logits, rtol=0, atol=1e-5)
    assert adapted.shape == (2, 8, 64) and not torch.allclose(adapted, hybrid, atol=1e-4)
