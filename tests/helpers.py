"""Tiny deterministic model builders shared by the test suite (no network, no files).

Every builder seeds its own generator, so the same arguments give bit-identical weights in any
test, in any order. Sizes are chosen so a forward pass takes milliseconds on one CPU core.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they lose ~20x to
# contention (measured: 0.22 s vs 0.011 s per forward of tiny_qwen2 under load).
torch.set_num_threads(1)


def _seeded():
    """Fork the global RNG so building a model never disturbs the caller's random stream."""
    return torch.random.fork_rng(devices=[])


def tiny_qwen2_config(*, layers: int = 2, d: int = 32, intermediate: int = 64, vocab: int = 64,
                      heads: int = 4, kv_heads: int = 2, init_std: float = 0.1,
                      max_positions: int = 256) -> Qwen2Config:
    """A Qwen2 config shaped like the paper's 7B (GQA, untied head) but a few thousand parameters."""
    return Qwen2Config(
        vocab_size=vocab, hidden_size=d, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        initializer_range=init_std, tie_word_embeddings=False, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_qwen2(seed: int = 0, layers: int = 2, d: int = 32, *, intermediate: int = 64, vocab: int = 64,
               heads: int = 4, kv_heads: int = 2, init_std: float = 0.1,
               dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """A random Qwen2ForCausalLM, in eval mode, eager attention (exact and padding-safe on CPU)."""
    cfg = tiny_qwen2_config(layers=layers, d=d, intermediate=intermediate, vocab=vocab, heads=heads,
                            kv_heads=kv_heads, init_std=init_std)
    cfg._attn_implementation = "eager"
    with _seeded():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


def tiny_llama(seed: int = 0, layers: int = 2, d: int = 32, *, intermediate: int = 64, vocab: int = 64,
               heads: int = 4, kv_heads: int = 2, init_std: float = 0.1,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A random LlamaForCausalLM of the same geometry (the "Llama-shaped decoders work too" check)."""
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        initializer_range=init_std, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    with _seeded():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def tiny_pair(seed: int = 0, **kw) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    """(base, target): two independent random Qwen2 models of one geometry (seeds ``seed``, ``seed + 1``)."""
    return tiny_qwen2(seed, **kw), tiny_qwen2(seed + 1, **kw)


def random_ids(seed: int, batch: int = 2, seq: int = 8, vocab: int = 64) -> torch.Tensor:
    """Deterministic token ids [batch, seq] avoiding the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def randomize_adapters(model, seed: int = 0, scale: float = 0.3):
    """Give an AdapterModel's adapters trained-looking weights (init leaves decoder and biases zero).

    Encoder biases are small, so a good share of features fire; returns the model for chaining.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in model.adapters:
            ad.W_dec.copy_(torch.randn(ad.W_dec.shape, generator=g) * scale)
            ad.b_enc.copy_(torch.randn(ad.b_enc.shape, generator=g) * 0.1)
            if ad.b_dec is not None:
                ad.b_dec.copy_(torch.randn(ad.b_dec.shape, generator=g) * 0.1)
    return model


def tiny_adapter_model(seed: int = 0, n_features: int = 16, *, trained: bool = True, **cfg_kw):
    """An AdapterModel on ``tiny_pair(seed)`` (target backbone unless ``backbone=`` says otherwise)."""
    from training.adapter import build_adapter_model
    from training.config import AdapterConfig

    base, target = tiny_pair(seed)
    with _seeded():  # the adapters' encoder init draws from the global RNG: same weights in any test order
        torch.manual_seed(seed)
        model = build_adapter_model(base, target, AdapterConfig(n_features=n_features, **cfg_kw))
    return randomize_adapters(model, seed) if trained else model
