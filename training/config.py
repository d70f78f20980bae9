"""Typed configuration for the ML side: adapters and training.

Frozen dataclasses, passed whole to constructors (nanoGPT's ``GPTConfig`` shape). YAML files and
CLI flags load into them; a run stores ``asdict(cfg)`` of the config it actually used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Backbone = Literal["target", "base"]


@dataclass(frozen=True)
class AdapterConfig:
    """One transcoder adapter per layer: ``f = ReLU(W_enc x + b_enc)``, ``out = base_mlp(x) + W_dec f + b_dec``."""

    n_features: int = 8192  # per layer; the paper's width
    dec_bias: bool = True  # the released checkpoints have a decoder bias
    backbone: Backbone = "target"  # embeddings/attention/norms/head from the target (paper) or the base
