"""Which precision a training run computes in, and the one part of a bf16 step kept in fp32: attention.

``"auto"`` (the organism's presets) means bf16 autocast where the device multiplies bfloat16 matrices
natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32: on a CPU without them, bf16 is
emulated and slower than fp32. On this project's 2-core AMD EPYC (AVX512-BF16) a bf16 product of the
organism's shapes runs ~2.4x faster than fp32, the organism build's step ~1.3x and an adapter training step
1.2-1.6x (README, *bf16 on the CPU*).

Under autocast, torch's CPU scaled-dot-product attention runs its backward in bf16 ~6x slower than in fp32
(a third of the organism's step). :func:`fp32_attention` runs a model's attention in fp32 meanwhile: the
products around it stay bf16, and the attention is a small part of the step's arithmetic.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SDPA_FP32 = "sdpa-fp32"


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively. On x86 that is AVX512-BF16 or AMX: oneDNN's own
    check also says yes for any AVX-512 CPU (Skylake to Ice Lake Xeons), which only emulate bf16; elsewhere
    (aarch64) oneDNN decides."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(setting: str, device: torch.device | str = "cpu") -> Literal["bf16", "fp32"]:
    """The precision that runs: ``bf16`` and ``fp32`` as given, ``auto`` as the device does best."""
    if setting == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if setting not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {setting!r}")
    return setting  # type: ignore[return-value]


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


# No mask function is registered with it, so transformers builds no mask under this name and SDPA runs plain
# causal attention: exact for right-padded batches (the organism build's and the trainer's; a test checks it),
# wrong for left padding and sliding windows, which fp32_attention therefore leaves alone (sliding windows) and
# which training never feeds it. Registering transformers' ``sdpa_mask`` would make it general, but moves the
# organism's figures (a masked SDPA is another kernel, another float order): the slow tier saw the study's set
# go from 19 features to 9. To do with a re-measure of the README's figures.
AttentionInterface.register(SDPA_FP32, _sdpa_fp32)


@contextlib.contextmanager
def fp32_attention(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, a transformers ``model`` that uses SDPA computes its attention in fp32 (under a bf16
    autocast too); its own setting comes back after. Only for right-padded batches (see above). Other
    implementations (eager, flash) and models with sliding windows are left alone: flash attention on a GPU is
    what bf16 is for."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if not enabled or current != "sdpa" or windowed or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(SDPA_FP32)
    try:
        yield
    finally:
        model.set_attn_implementation(current)
