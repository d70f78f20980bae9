"""How much accelerator memory training adapters on a model pair needs, before a 7B download or a GPU hour.

The train job holds, on one device: the whole target model (its MLPs stay loaded for target mode and
the A→T bridge), the base model's MLPs, the adapters, their gradients and AdamW's two moments; plus,
per step, the activations the fused step saves for its single backward (the adapter pass, and at a
bridging cutoff k the target blocks ≥ k of A→T and the adapter blocks ≥ k of T→A: worst case k = 1,
about 3L blocks), the teacher pass's L+1 residuals, and the chunked head + KL buffers (a few
``kl_chunk × vocab`` float32 tensors alive at once). See training/step.py and training/losses.py.

Activation sizes come from a per-block, per-token element count calibrated against the tensors the
fused step actually saves for backward (``torch.autograd.graph.saved_tensors_hooks`` on small Qwen2
pairs, CPU, SDPA attention with no ``seq × seq`` matrix, as flash/efficient attention on a GPU):
``5.5 d + 2.2 d_mlp + 0.6 F + 200`` elements per token and block (tests/unit/test_memory_plan.py checks
it within 25 %). It is an estimate: allocator fragmentation, CUDA context (~0.5–1 GB) and kernels'
workspaces come on top; the plan adds a 10 % margin and says so.

With activation checkpointing (``recompute``, ``TrainConfig.activation_checkpointing``) the fused step
keeps only each block's input and, in the adapter pass, its features (the L1 needs them), and recomputes
one block's internals at a time in the backward. Calibrated the same way (seven small shapes, exact fits):
``d + F`` elements per token per adapter block plus ``2 d`` for the pass (final norm input, the head +
KL's hidden gradient), ``d`` per bridging block plus ``3 d`` per direction (block-k entry state, final
norm, hidden gradient); on top, one block's full internals (the count above) alive during its recompute.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GB = 1e9  # decimal gigabytes, as GPU spec sheets and ``save_pretrained`` shard sizes use
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

# Saved-for-backward elements per token per transformer block (calibrated; see the module docstring).
ACT_PER_D, ACT_PER_MLP, ACT_PER_FEATURE, ACT_PER_BLOCK = 5.5, 2.2, 0.6, 200.0
# With activation checkpointing (recompute): per token, per block and per pass (calibrated likewise).
RC_PER_D, RC_PER_FEATURE, RC_ADAPTER_PASS_PER_D = 1.0, 1.0, 2.0  # adapter pass: block inputs, features
RC_BRIDGE_PER_D, RC_BRIDGE_DIRECTION_PER_D = 1.0, 3.0  # bridges: block inputs; entry, final norm, grad
KL_LIVE_TENSORS = 6  # float32 [kl_chunk × vocab] tensors alive at once in the fused head + KL
MARGIN = 0.10  # fragmentation and workspaces


@dataclass(frozen=True)
class ModelShape:
    """The geometry of a decoder-only causal LM (what config.json says), enough to count bytes."""

    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama/Mistral do not

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "d_mlp", "n_heads", "n_kv_heads", "vocab"):
            if getattr(self, key) < 1:
                raise ValueError(f"invalid model shape {self.name!r}: {key}={getattr(self, key)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"invalid model shape {self.name!r}: d_model {self.d_model} is not a multiple of "
                             f"n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def attention_params(self) -> int:
        """q, k, v, o projections (+ q/k/v biases) and the two RMSNorm gains of one block."""
        d, kv = self.d_model, self.kv_dim
        bias = (d + 2 * kv) if self.qkv_bias else 0
        return d * d + 2 * d * kv + d * d + bias + 2 * d

    def mlp_params(self) -> int:
        """gate, up and down projections of one block (no biases)."""
        return 3 * self.d_model * self.d_mlp

    def embedding_params(self) -> int:
        """Token embeddings, final norm and the LM head (counted once when tied)."""
        return self.vocab * self.d_model * (1 if self.tie_embeddings else 2) + self.d_model

    def total_params(self) -> int:
        return self.embedding_params() + self.n_layers * (self.attention_params() + self.mlp_params())

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "model") -> ModelShape:
        """From a Hugging Face ``config.json`` dict (Qwen2, Llama, Mistral keys)."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                name=name,
                n_layers=int(config["num_hidden_layers"]),
                d_model=int(config["hidden_size"]),
                d_mlp=int(config["intermediate_size"]),
                n_heads=heads,
                n_kv_heads=int(config.get("num_key_value_heads") or heads),
                vocab=int(config["vocab_size"]),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
            )
        except KeyError as exc:
            raise ValueError(f"config of {name!r} lacks {exc.args[0]!r}; is it a decoder-only causal LM?") from None


_QWEN25_7B = {"n_layers": 28, "d_model": 3584, "d_mlp": 18944, "n_heads": 28, "n_kv_heads": 4, "vocab": 152064}
NAMED_SHAPES: dict[str, ModelShape] = {
    # The paper's pair (Qwen/Qwen2.5-Math-7B → deepseek-ai/DeepSeek-R1-Distill-Qwen-7B) share this geometry.
    "qwen2.5-7b": ModelShape("qwen2.5-7b", **_QWEN25_7B),
    "qwen2.5-math-7b": ModelShape("qwen2.5-math-7b", **_QWEN25_7B),
    "deepseek-r1-distill-qwen-7b": ModelShape("deepseek-r1-distill-qwen-7b", **_QWEN25_7B),
    "qwen2.5-1.5b": ModelShape("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, 151936, tie_embeddings=True),
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, tie_embeddings=True),
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256, qkv_bias=False),
}


def resolve_shape(spec: str | Path) -> ModelShape:
    """A named shape (``qwen2.5-7b`` …), a ``config.json`` file, or a model directory holding one.

    Hub ids are looked up in the local Hugging Face cache only (``config.json`` is a few KB; fetch it
    with ``huggingface-cli download <id> config.json``); nothing is downloaded here.
    """
    text = str(spec)
    if text.lower() in NAMED_SHAPES:
        return NAMED_SHAPES[text.lower()]
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelShape.from_hf_config(json.loads(path.read_text()), name=text)
    cached = _cached_hub_config(text)
    if cached is not None:
        return ModelShape.from_hf_config(json.loads(cached.read_text()), name=text)
    raise ValueError(f"unknown model shape {text!r}: not a named shape ({', '.join(NAMED_SHAPES)}), not a "
                     f"config.json or model directory, and not in the local Hugging Face cache")


def _cached_hub_config(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # the web image has no huggingface_hub
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    """The estimate, item by item; ``total`` includes the margin."""

    base: ModelShape
    target: ModelShape
    n_features: int
    seq_len: int
    batch_size: int
    kl_chunk: int
    weight_dtype: str
    adapter_dtype: str
    precision: str
    recompute: bool = False
    items: list[PlanItem] = field(default_factory=list)

    @property
    def subtotal(self) -> float:
        return sum(i.bytes for i in self.items)

    @property
    def total(self) -> float:
        return self.subtotal * (1 + MARGIN)

    def item(self, name: str) -> PlanItem:
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(name)

    def fits(self, device_gb: float) -> bool:
        return self.total <= device_gb * GB

    def to_dict(self) -> dict:
        return {
            "base": asdict(self.base), "target": asdict(self.target), "n_features": self.n_features,
            "seq_len": self.seq_len, "batch_size": self.batch_size, "kl_chunk": self.kl_chunk,
            "weight_dtype": self.weight_dtype, "adapter_dtype": self.adapter_dtype, "precision": self.precision,
            "recompute": self.recompute, "items": [asdict(i) for i in self.items], "margin": MARGIN, "total_bytes": self.total,
            "total_gb": round(self.total / GB, 2),
        }

    def format(self) -> str:
        """A table for people (decimal GB)."""
        head = (f"memory plan: base {self.base.name} → target {self.target.name}; {self.n_features} features × "
                f"{self.target.n_layers} layers; {self.batch_size} × {self.seq_len} tokens; weights "
                f"{self.weight_dtype}, adapters {self.adapter_dtype}, compute {self.precision}; kl_chunk {self.kl_chunk}; "
                f"activation checkpointing {'on' if self.recompute else 'off'}")
        width = max(len(i.name) for i in self.items)
        lines = [head, ""]
        lines += [f"  {i.name:<{width}}  {i.bytes / GB:8.2f} GB  {i.note}" for i in self.items]
        lines += [f"  {'margin (10 %)':<{width}}  {self.subtotal * MARGIN / GB:8.2f} GB  fragmentation, workspaces",
                  f"  {'total':<{width}}  {self.total / GB:8.2f} GB  (+ CUDA context ~0.5-1 GB)"]
        return "\n".join(lines)


def _bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}") from None


def block_activation_elements(shape: ModelShape, n_features: int, d_mlp: int | None = None) -> float:
    """Saved-for-backward elements per token of one block (calibrated constant; see the module docstring)."""
    return (ACT_PER_D * shape.d_model + ACT_PER_MLP * (d_mlp or shape.d_mlp) + ACT_PER_FEATURE * n_features
            + ACT_PER_BLOCK)


def plan_memory(base: ModelShape | str, target: ModelShape | str, *, n_features: int = 8192, seq_len: int = 10240,
                batch_size: int = 1, kl_chunk: int = 1024, weight_dtype: str = "bf16", adapter_dtype: str | None = None,
                precision: str = "bf16", bridging: bool = True, recompute: bool = False) -> MemoryPlan:
    """Estimate the train job's peak device memory for one pair; see the module docstring for the model.

    ``adapter_dtype`` defaults to the weights' (the adapter model builds its adapters in the target's
    dtype); gradients and AdamW's moments share it. ``precision`` is the compute dtype (bf16 autocast or
    fp32). ``bridging=False`` leaves out the bridge blocks (a run with ``loss.bridge = 0``). ``recompute``:
    activation checkpointing (``fused_step(recompute=True)``), which keeps block inputs and features only.
    """
    base = resolve_shape(base) if isinstance(base, str | Path) else base
    target = resolve_shape(target) if isinstance(target, str | Path) else target
    for key in ("n_layers", "d_model"):
        if getattr(base, key) != getattr(target, key):
            raise ValueError(f"base and target differ in {key}: {getattr(base, key)} vs {getattr(target, key)}; "
                             "the adapter model needs the same depth and width")
    for key, value in (("n_features", n_features), ("seq_len", seq_len), ("batch_size", batch_size),
                       ("kl_chunk", kl_chunk)):
        if int(value) < 1:
            raise ValueError(f"{key} must be at least 1, not {value!r}")
    adapter_dtype = adapter_dtype or weight_dtype
    wb, ab, cb = _bytes(weight_dtype), _bytes(adapter_dtype), _bytes(precision)
    L, d, F = target.n_layers, target.d_model, n_features
    tokens = batch_size * seq_len
    adapter_params = L * (2 * d * F + F + d)
    rows = min(kl_chunk, tokens)

    items = [
        PlanItem("target model", target.total_params() * wb,
                 f"{target.total_params() / 1e9:.2f} B params, all of it (its MLPs serve target mode and A→T)"),
        PlanItem("base MLPs", L * base.mlp_params() * wb, f"{L * base.mlp_params() / 1e9:.2f} B params"),
        PlanItem("adapters", adapter_params * ab, f"{adapter_params / 1e9:.3f} B params (W_enc, W_dec, biases)"),
        PlanItem("adapter gradients", adapter_params * ab, ""),
        PlanItem("AdamW moments", 2 * adapter_params * ab, "exp_avg and exp_avg_sq"),
    ]
    per_token_block = block_activation_elements(target, F, base.d_mlp) * cb
    n_bridge = 2 * (L - 1) if bridging and L > 1 else 0
    if recompute:
        kept = (RC_PER_D * d + RC_PER_FEATURE * F) * cb
        items.append(PlanItem("activations: adapter pass", tokens * (L * kept + RC_ADAPTER_PASS_PER_D * d * cb),
                              f"checkpointed: {L} blocks × {tokens} tokens × {kept / 1e3:.1f} kB (input, features)"))
        if n_bridge:
            items.append(PlanItem("activations: bridging (k = 1)",
                                  tokens * (n_bridge * RC_BRIDGE_PER_D + 2 * RC_BRIDGE_DIRECTION_PER_D) * d * cb,
                                  f"checkpointed: {n_bridge} block inputs at the worst cutoff"))
        items.append(PlanItem("activations: one block recomputed", tokens * per_token_block,
                              f"{tokens} tokens × {per_token_block / 1e3:.1f} kB, during the backward"))
    else:
        items.append(PlanItem("activations: adapter pass", tokens * L * per_token_block,
                              f"{L} blocks × {tokens} tokens × {per_token_block / 1e3:.1f} kB"))
        if n_bridge:
            items.append(PlanItem("activations: bridging (k = 1)", tokens * n_bridge * per_token_block,
                                  f"{n_bridge} blocks at the worst cutoff; mean over k is about half"))
    items.append(PlanItem("teacher pass states", tokens * (L + 3) * d * cb,
                          "L+1 residuals for NMSE, block-k states, final hidden"))
    n_students = 3 if bridging else 1
    items.append(PlanItem("head + KL (chunked)", rows * target.vocab * 4 * KL_LIVE_TENSORS
                          + n_students * tokens * d * cb,
                          f"{KL_LIVE_TENSORS} float32 [{rows} × {target.vocab}] buffers, {n_students} hidden grads"))
    return MemoryPlan(base=base, target=target, n_features=F, seq_len=seq_len, batch_size=batch_size,
                      kl_chunk=kl_chunk, weight_dtype=weight_dtype, adapter_dtype=adapter_dtype, precision=precision,
                      recompute=recompute, items=items)


def max_seq_len_for(device_gb: float, base: ModelShape | str, target: ModelShape | str, **kwargs) -> int:
    """The longest sequence (batch 1) whose plan fits ``device_gb``; 0 when even the weights do not fit."""
    lo, hi = 0, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_memory(base, target, seq_len=mid, batch_size=1, **kwargs).fits(device_gb):
            lo = mid
        else:
            hi = mid - 1
    return lo


def weights_only_gb(shape: ModelShape, dtype: str = "bf16") -> float:
    """Inference footprint of one model's weights (for the worker serving collect/ablate/attribute)."""
    return shape.total_params() * _bytes(dtype) / GB


def saved_tensor_bytes(model: Any, forward: Callable[[], Any]) -> tuple[Any, int]:
    """``(forward(), bytes)``: the distinct non-parameter storages ``forward`` saves for its backward.

    How the activation counts above were calibrated (``torch.autograd.graph.saved_tensors_hooks``), kept
    in one place for the tests and the benchmark. Parameters do not count (they are weights, not activations).
    """
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return result, sum(seen.values())
