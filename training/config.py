"""Typed configuration for the ML side: adapters and training.

Frozen dataclasses, passed whole to constructors (nanoGPT's ``GPTConfig`` shape). YAML files and
CLI flags load into them; a run stores ``asdict(cfg)`` of the config it actually used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

Backbone = Literal["target", "base"]


@dataclass(frozen=True)
class AdapterConfig:
    """One transcoder adapter per layer: ``f = ReLU(W_enc x + b_enc)``, ``out = base_mlp(x) + W_dec f + b_dec``."""

    n_features: int = 8192  # per layer; the paper's width
    dec_bias: bool = True  # the released checkpoints have a decoder bias
    backbone: Backbone = "target"  # embeddings/attention/norms/head from the target (paper) or the base


# -- training ------------------------------------------------------------------------------------------------

Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the paper's objective; ``bridge`` applies to each direction (A→T and T→A) separately."""

    kl: float = 1.0  # KL(p_target || p_adapted), mean over non-pad positions
    nmse: float = 1.0  # residual-stream NMSE, mean over the L+1 points
    bridge: float = 2.0  # per direction, at one random cutoff per step
    l1: float = 1e-3  # decoder-norm-weighted L1 (the paper's main λ)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs besides the models and the data; stored whole with each checkpoint."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    lr: float = 8e-4
    warmup_frac: float = 0.05  # linear warm-up over this fraction of all steps, then cosine
    min_lr_frac: float = 0.0  # the cosine ends at lr * min_lr_frac
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global norm of the adapter gradients; 0 disables clipping
    batch_size: int = 1  # sequences per step
    max_seq_len: int = 10240  # tokens; longer sequences are truncated
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    # "bf16": autocast matmuls to bfloat16 (the paper trains in bf16); "auto": bf16 where the device has it
    # natively, else fp32 (training/precision.py)
    precision: Precision = "fp32"
    seed: int = 42  # torch, python random, data order and bridging cutoffs
    kl_chunk: int = 1024  # positions per chunk of the fused head + KL (bounds seq × vocab memory)
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    dead_windows: tuple[int, ...] = (100, 1000)  # a feature is dead if it fired in none of the last N sequences
    # Recompute each block's internals in the backward instead of keeping them (training/step.py): the
    # same gradients, ~8x less activation memory, ~1.3x the step time (benchmarks/train_step.py, CPU).
    # What fits the paper's 10k tokens on one 80 GB GPU.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "warmup_frac": 0.0 <= self.warmup_frac < 1.0,
            "min_lr_frac": 0.0 <= self.min_lr_frac <= 1.0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "batch_size": self.batch_size >= 1,
            "max_seq_len": self.max_seq_len >= 1,
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "precision": self.precision in ("auto", "fp32", "bf16"),
            "kl_chunk": self.kl_chunk >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "dead_windows": all(w >= 1 for w in self.dead_windows),
            "activation_checkpointing": isinstance(self.activation_checkpointing, bool),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid TrainConfig.{name}: {getattr(self, name)!r}")
        if self.adapter.n_features < 1:
            raise ValueError(f"invalid AdapterConfig.n_features: {self.adapter.n_features!r}")
        if self.adapter.backbone not in ("target", "base"):
            raise ValueError(f"invalid AdapterConfig.backbone: {self.adapter.backbone!r}; use target or base")


PRESETS: dict[str, TrainConfig] = {
    # The paper's run: 8192 features per layer, one ≤10k-token sequence per step, bf16, one epoch; with
    # activation checkpointing it plans at ~65 GB on one GPU (`adapterlens plan`), without it ~173 GB.
    "paper-7b": TrainConfig(adapter=AdapterConfig(n_features=8192), precision="bf16", batch_size=1,
                            max_seq_len=10240, checkpoint_every=1000, activation_checkpointing=True),
    # The demo organism (4 layers, d 128, traces ≤ ~60 tokens): many short sequences per step.
    # λ_L1 = 1e-2 and lr 2e-3: the organism trains on ~1.2 M tokens (the paper: ~160 M), too few for the
    # paper's 1e-3 / 8e-4 to sparsify. Measured (README, Results; bf16 organism): L0 43.7 of 512, KL 0.023 of the
    # hybrid's 2.40, 98.5% of the target's hesitations reproduced with 1.2% false ones, adapted accuracy 98.7%.
    "organism": TrainConfig(adapter=AdapterConfig(n_features=512), loss=LossWeights(l1=1e-2), lr=2e-3,
                            batch_size=32, max_seq_len=128, max_steps=800, kl_chunk=4096, checkpoint_every=200,
                            precision="auto"),
    # Seconds on a laptop CPU: for tests and smoke runs.
    "organism-tiny": TrainConfig(adapter=AdapterConfig(n_features=64), batch_size=8, max_seq_len=64,
                                 max_steps=30, kl_chunk=512, checkpoint_every=10),
}


def preset(name: str) -> TrainConfig:
    """A named :class:`TrainConfig` (``organism``, ``organism-tiny``, ``paper-7b``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown training preset {name!r}; choose from {sorted(PRESETS)}") from None


# -- plain dicts, YAML and dotted overrides --------------------------------------------------------------------

_NESTED = {"adapter": AdapterConfig, "loss": LossWeights}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML/flag value into the field's type, or raise ValueError naming the field."""
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise ValueError(f"{name} may not be null")
    if text.startswith("tuple"):
        if isinstance(value, str | int | float):
            value = [value]
        inner = "float" if "float" in text else "int"
        return tuple(_coerce(name, v, inner) for v in value)
    if text in ("bool",):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    for typ in (int, float):
        if text.split(" |")[0] == typ.__name__:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"{name} must be a number, not {value!r}")
            try:
                number = typ(value) if typ is float else int(str(value)) if isinstance(value, str) else value
            except ValueError:
                raise ValueError(f"{name} must be a number, not {value!r}") from None
            if typ is int and (not isinstance(number, int) or isinstance(number, bool)):
                if float(number).is_integer():
                    return int(number)
                raise ValueError(f"{name} must be an integer, not {value!r}")
            return number
    return value  # Literal / str fields: validated by __post_init__


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, not {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {[prefix + k for k in unknown]}; "
                         f"known: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        if key in _NESTED and cls is TrainConfig:
            kwargs[key] = _from_dict(_NESTED[key], value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, known[key].type)
    return cls(**kwargs)


def train_config_from_dict(data: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from a (possibly partial, nested) dict on top of ``base`` (default: defaults)."""
    merged = train_config_to_dict(base or TrainConfig())
    for key, value in (data or {}).items():
        if key in _NESTED and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return _from_dict(TrainConfig, merged)


def train_config_to_dict(cfg: TrainConfig) -> dict:
    """Plain, YAML/JSON-safe dict (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else plain(v))
            for k, v in asdict(cfg).items()}


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Apply ``key=value`` strings with dotted keys (``lr=1e-3``, ``loss.l1=3e-4``, ``adapter.n_features=1024``).

    Values are parsed as YAML scalars/lists (``betas=[0.9,0.95]``, ``max_steps=null``).
    """
    data: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value.strip() and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in _NESTED):
            raise ValueError(f"unknown config key {key!r}; nested keys are adapter.* and loss.*")
        if len(parts) == 2:
            data.setdefault(parts[0], {})[parts[1]] = value
        else:
            data[key] = value
    return train_config_from_dict(data, base=cfg)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_train_config(path: str | Path | None = None, *, preset_name: str | None = None,
                      overrides: Iterable[str] = ()) -> TrainConfig:
    """Preset (or defaults), then a YAML file on top, then ``key=value`` overrides on top of that."""
    cfg = preset(preset_name) if preset_name else TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"training config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        cfg = train_config_from_dict(data, base=cfg)
    return apply_overrides(cfg, overrides)


def dump_train_config(cfg: TrainConfig, path: str | Path | None = None) -> str:
    """YAML text of ``cfg``; also written to ``path`` when given."""
    text = yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
