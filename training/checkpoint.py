"""Adapter checkpoints in two formats: ours (adapters only) and the paper's released full models.

**Ours** (a directory): ``adapters.safetensors`` with ``layers.{i}.W_enc`` [F, d], ``layers.{i}.b_enc`` [F],
``layers.{i}.W_dec`` [d, F], ``layers.{i}.b_dec`` [d] (when ``dec_bias``), and ``adapter_config.json``
(the :class:`AdapterConfig` fields, base/target model names, ``d_model``, ``n_layers``, ``dtype``, and an
optional ``extra`` dict). Small, and meaningful only with the named base and target models.

**Reference** (nathanhu0/transcoder-adapters, ``Qwen2ForCausalLMWithTranscoder``): a whole model as
``save_pretrained`` writes it: the target's embeddings, attention, norms and head, the *base* MLPs under
the usual ``mlp.gate_proj/up_proj/down_proj`` names, and per layer ``mlp.transcoder_enc.{weight,bias}``
and ``mlp.transcoder_dec.{weight,bias}``; ``config.json`` adds ``transcoder_n_features`` and
``transcoder_dec_bias``. Single ``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(shard boundaries may cut through a layer, so every tensor is looked up in ``weight_map``).
A plain ``from_pretrained`` drops the transcoder tensors with only a warning; here missing adapters are
an error. Our ``W_dec`` has the same [d, F] layout as ``transcoder_dec.weight``, so no transpose.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from training.adapter import AdapterModel, build_adapter_model, decoder_layers
from training.config import AdapterConfig
from training.models import REFERENCE_ARCHITECTURE, load_causal_lm, resolve_device

logger = logging.getLogger(__name__)

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT_NAME = "adapterlens-adapters"
FORMAT_VERSION = 1
REFERENCE_SINGLE_FILE = "model.safetensors"
REFERENCE_INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = "5GB"  # what save_pretrained used for the released 7B checkpoints

_ADAPTER_TO_REFERENCE = {
    "W_enc": "transcoder_enc.weight",
    "b_enc": "transcoder_enc.bias",
    "W_dec": "transcoder_dec.weight",
    "b_dec": "transcoder_dec.bias",
}
_REF_TRANSCODER = re.compile(r"^model\.layers\.(\d+)\.mlp\.(transcoder_(?:enc|dec)\.(?:weight|bias))$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write safetensors through a temporary file so a killed job never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- our format -------------------------------------------------------------------------------------

def adapter_state_dict(model: AdapterModel) -> dict[str, torch.Tensor]:
    """``layers.{i}.W_enc`` … for every layer (b_dec only when the adapters have a decoder bias)."""
    out: dict[str, torch.Tensor] = {}
    for i, ad in enumerate(model.adapters):
        out[f"layers.{i}.W_enc"], out[f"layers.{i}.b_enc"] = ad.W_enc, ad.b_enc
        out[f"layers.{i}.W_dec"] = ad.W_dec
        if ad.b_dec is not None:
            out[f"layers.{i}.b_dec"] = ad.b_dec
    return out


def save_adapters(model: AdapterModel, path: str | os.PathLike, *, base_name: str, target_name: str,
                  extra: dict | None = None) -> Path:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into directory ``path`` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    first = model.adapters[0]
    meta = {
        **asdict(model.cfg),
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model": base_name,
        "target_model": target_name,
        "d_model": first.d_model,
        "n_layers": model.n_layers,
        "dtype": _dtype_name(first.W_enc.dtype),
        "extra": extra or {},
    }
    _atomic_save(adapter_state_dict(model), path / ADAPTERS_FILE)
    _atomic_json(meta, path / ADAPTER_CONFIG_FILE)
    logger.info("saved %d layers of adapters (%d features) to %s", model.n_layers, model.n_features, path)
    return path


def is_reference_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a paper-format model (``config.json`` names the transcoder architecture)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    raw = json.loads(cfg_file.read_text())
    return REFERENCE_ARCHITECTURE in (raw.get("architectures") or []) or "transcoder_n_features" in raw


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The checkpoint's description as a dict with our keys, for either format.

    For a reference checkpoint: ``format`` "reference", ``n_features``, ``dec_bias``, ``backbone``
    "target", ``d_model``, ``n_layers``, ``dtype`` and the raw ``config`` (model names are unknown: None).
    """
    path = Path(path)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return json.loads((path / ADAPTER_CONFIG_FILE).read_text())
    if is_reference_checkpoint(path):
        raw = json.loads((path / "config.json").read_text())
        return {
            "format": "reference",
            "n_features": int(raw["transcoder_n_features"]),
            "dec_bias": bool(raw.get("transcoder_dec_bias", False)),  # the reference class defaults to False
            "backbone": "target",
            "base_model": None,
            "target_model": raw.get("_name_or_path") or None,
            "d_model": int(raw["hidden_size"]),
            "n_layers": int(raw["num_hidden_layers"]),
            "dtype": raw.get("dtype") or raw.get("torch_dtype"),
            "config": raw,
        }
    raise FileNotFoundError(
        f"{str(path)!r} is not an adapter checkpoint: no {ADAPTER_CONFIG_FILE}, and no config.json naming "
        f"{REFERENCE_ARCHITECTURE}"
    )


def adapter_config_from_dict(meta: dict) -> AdapterConfig:
    """The :class:`AdapterConfig` stored in a checkpoint description (unknown keys ignored)."""
    names = {f.name for f in fields(AdapterConfig)}
    return AdapterConfig(**{k: v for k, v in meta.items() if k in names})


def _check_geometry(model: AdapterModel, meta: dict, where: Path) -> None:
    first = model.adapters[0]
    have = {"n_features": model.n_features, "dec_bias": first.b_dec is not None, "d_model": first.d_model,
            "n_layers": model.n_layers, "backbone": model.cfg.backbone}
    bad = [f"{k}: checkpoint {meta[k]!r}, model {v!r}" for k, v in have.items() if k in meta and meta[k] != v]
    if bad:
        raise ValueError(f"adapter checkpoint {str(where)!r} does not fit this model ({'; '.join(bad)})")


def _copy_into_adapters(model: AdapterModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy ``layers.{i}.X`` tensors into the adapters after checking names and shapes exactly."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors), key=_natural)
    unexpected = sorted(set(tensors) - set(expected), key=_natural)
    if missing or unexpected:
        raise ValueError(f"adapter checkpoint {str(where)!r} does not fit this model: missing "
                         f"{_preview(missing)}, unexpected {_preview(unexpected)}")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(f"adapter checkpoint {str(where)!r}: {name} has shape {tuple(tensors[name].shape)}, "
                             f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def load_adapters(model: AdapterModel, path: str | os.PathLike) -> AdapterModel:
    """Load adapter weights into ``model`` in place (cast to its dtype/device) and return it.

    ``path``: our directory, or a reference checkpoint (only its transcoder tensors are read; its other
    weights are ignored, so the model's own base and target are kept). Any mismatch of layers, width,
    decoder bias or shapes is a ``ValueError`` naming both sides.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    _check_geometry(model, meta, path)
    if meta.get("format") == "reference":
        _check_transcoders_present(path, set(reference_weight_map(path)), meta["n_layers"], meta["dec_bias"])
        tensors = {_reference_to_ours(name): t for name, t in _read_tensors(path, _is_transcoder_name)}
    else:
        file = path / ADAPTERS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"adapter checkpoint {str(path)!r} has no {ADAPTERS_FILE}")
        with safe_open(str(file), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    _copy_into_adapters(model, tensors, path)
    logger.info("loaded adapters from %s (%s format)", path, meta.get("format"))
    return model


# -- the reference format ---------------------------------------------------------------------------

def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _preview(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    more = f" … ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _is_transcoder_name(name: str) -> bool:
    return _REF_TRANSCODER.match(name) is not None


def _reference_to_ours(name: str) -> str:
    layer, part = _REF_TRANSCODER.match(name).groups()
    ours = {v: k for k, v in _ADAPTER_TO_REFERENCE.items()}[part]
    return f"layers.{layer}.{ours}"


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB`` / ``500MiB`` / ``100KB`` / an int (decimal units as in ``save_pretrained``)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be positive, not {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read shard size {size!r}; use an int or e.g. '5GB', '500MB', '64KiB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return max(1, int(float(m.group(1)) * scale))


def reference_state_dict(model: AdapterModel) -> dict[str, torch.Tensor]:
    """The adapter model's weights under the reference names, in ``save_pretrained`` order.

    Target MLPs kept for target mode are left out (the format has no place for them).
    """
    if model.cfg.backbone != "target":
        raise ValueError("the reference format stores a target-backbone model; this one has backbone="
                         f"{model.cfg.backbone!r} (save it with save_adapters instead)")
    tied = bool(getattr(model.hf.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(model\.layers\.\d+\.mlp\.)(base_mlp|adapter|target_mlp)\.(.+)$")
    for name, tensor in model.hf.state_dict().items():
        m = pattern.match(name)
        if m is None:
            if not (tied and name == "lm_head.weight"):
                out[name] = tensor
            continue
        prefix, part, rest = m.groups()
        if part == "base_mlp":
            out[prefix + rest] = tensor
        elif part == "adapter":
            out[prefix + _ADAPTER_TO_REFERENCE[rest]] = tensor
    return out


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy in-order split like ``save_pretrained``: a new shard when the next tensor would overflow."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save_reference_checkpoint(model: AdapterModel, path: str | os.PathLike, *,
                              max_shard_size: int | str = DEFAULT_SHARD_SIZE, tokenizer=None) -> Path:
    """Write ``model`` in the paper's released format (loadable by the reference code and by ours).

    Files: ``config.json``, ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, and the tokenizer's files when one is given.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = reference_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    config = model.hf.config.to_dict()
    config.update(architectures=[REFERENCE_ARCHITECTURE], transcoder_n_features=model.n_features,
                  transcoder_dec_bias=model.adapters[0].b_dec is not None, dtype=_dtype_name(dtype),
                  torch_dtype=_dtype_name(dtype))  # torch_dtype: what transformers 4.x readers look for
    config.pop("_name_or_path", None)
    for stale in [REFERENCE_INDEX_FILE, REFERENCE_SINGLE_FILE, *(p.name for p in path.glob("model-*.safetensors"))]:
        (path / stale).unlink(missing_ok=True)
    shards = _shards(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        _atomic_save(shards[0], path / REFERENCE_SINGLE_FILE)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, path / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map}, path / REFERENCE_INDEX_FILE)
    _atomic_json(config, path / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    logger.info("saved reference checkpoint (%d tensors, %d file(s)) to %s", len(tensors), len(shards), path)
    return path


def reference_weight_map(path: str | os.PathLike) -> dict[str, str]:
    """tensor name → file name, from the index when sharded, else from the single file."""
    path = Path(path)
    if (path / REFERENCE_INDEX_FILE).is_file():
        weight_map = json.loads((path / REFERENCE_INDEX_FILE).read_text())["weight_map"]
        absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if absent:
            raise FileNotFoundError(f"{str(path)!r}: shards named in {REFERENCE_INDEX_FILE} are missing: {absent}")
        return weight_map
    if (path / REFERENCE_SINGLE_FILE).is_file():
        with safe_open(str(path / REFERENCE_SINGLE_FILE), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), REFERENCE_SINGLE_FILE)
    raise FileNotFoundError(f"{str(path)!r} has neither {REFERENCE_SINGLE_FILE} nor {REFERENCE_INDEX_FILE} "
                            "(only safetensors checkpoints are supported)")


def _read_tensors(path: Path, keep=lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the names ``keep`` accepts, opening each shard once, in file order."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, fname in reference_weight_map(path).items():
        if keep(name):
            by_file[fname].append(name)
    for fname in sorted(by_file):
        with safe_open(str(path / fname), framework="pt") as fh:
            for name in by_file[fname]:
                yield name, fh.get_tensor(name)


def _check_transcoders_present(path: Path, names: set[str], n_layers: int, dec_bias: bool) -> None:
    parts = ["transcoder_enc.weight", "transcoder_enc.bias", "transcoder_dec.weight"]
    parts += ["transcoder_dec.bias"] if dec_bias else []
    missing = [f"model.layers.{i}.mlp.{p}" for i in range(n_layers) for p in parts
               if f"model.layers.{i}.mlp.{p}" not in names]
    if missing:
        raise ValueError(
            f"reference checkpoint {str(path)!r} lacks transcoder tensors ({_preview(missing)}); it may have been "
            "re-saved by AutoModelForCausalLM, which drops the adapters"
        )


def _attach_target_mlps(model: AdapterModel, target: str | nn.Module, dtype, device) -> None:
    """Give every layer the target's own MLP, so target mode works on the checkpoint's shared weights."""
    target_model = load_causal_lm(target, dtype=dtype, device=device) if isinstance(target, str | Path) else target
    t_layers = decoder_layers(target_model)
    if len(t_layers) != model.n_layers or target_model.config.hidden_size != model.config.hidden_size:
        raise ValueError(f"target {target!r} has {len(t_layers)} layers × {target_model.config.hidden_size}; the "
                         f"checkpoint has {model.n_layers} × {model.config.hidden_size}")
    ours = model.hf.get_input_embeddings().weight
    theirs = target_model.get_input_embeddings().weight
    if ours.shape != theirs.shape or not torch.allclose(ours.float().cpu(), theirs.float().cpu(), atol=1e-2):
        logger.warning("the target's embeddings differ from the checkpoint's: target mode will mix the "
                       "checkpoint's attention with %s's MLPs", target if isinstance(target, str) else "the given")
    for mlp, layer in zip(model.mlps, t_layers, strict=True):
        target_mlp = layer.mlp
        target_mlp.requires_grad_(False)
        mlp.target_mlp = target_mlp.to(device=ours.device, dtype=ours.dtype)


def load_reference_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                              device: str | torch.device = "cpu",
                              target: str | nn.Module | None = None,
                              attn_implementation: str | None = None) -> AdapterModel:
    """An :class:`AdapterModel` from a paper-format checkpoint: its MLPs become the base MLPs, its
    transcoder tensors the adapters. The file has no target MLPs, so target mode needs ``target`` (a
    name/path or a loaded model) whose MLPs are attached. ``dtype`` None keeps the file's dtype.

    The model is built on the meta device and tensors are assigned shard by shard, so peak memory is
    about one model. Missing transcoder (or any other) tensors are a ``ValueError``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"reference checkpoint {str(path)!r} is not a directory")
    meta = read_adapter_config(path)
    if meta.get("format") != "reference":
        raise ValueError(f"{str(path)!r} is in AdapterLens format; use load_adapter_model(..., adapters_path=)")
    device = resolve_device(device)
    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if attn_implementation is not None:
        hf_config._attn_implementation = attn_implementation
    weight_map = reference_weight_map(path)
    _check_transcoders_present(path, set(weight_map), meta["n_layers"], meta["dec_bias"])

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    expected = {name: tuple(t.shape) for name, t in hf.state_dict().items()}
    transcoder: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, tensor in _read_tensors(path):
        tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if _is_transcoder_name(name):
            transcoder[_reference_to_ours(name)] = tensor
        elif name in expected:
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"reference checkpoint {str(path)!r}: {name} has shape {tuple(tensor.shape)}, "
                                 f"its config.json implies {expected[name]}")
            hf.load_state_dict({name: tensor}, strict=False, assign=True)
        else:
            unknown.append(name)
    if unknown:
        logger.warning("ignored %d tensors the model does not use: %s", len(unknown), _preview(unknown))
    # Non-persistent buffers (rotary inv_freq) are not in the file: rebuild them from the config.
    rotary = getattr(hf.model, "rotary_emb", None)
    if rotary is not None:
        hf.model.rotary_emb = type(rotary)(config=hf.config).to(device)
    if getattr(hf.config, "tie_word_embeddings", False):
        hf.tie_weights()
    still_meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"reference checkpoint {str(path)!r} lacks model tensors: {_preview(still_meta)}")
    hf.eval()

    cfg = AdapterConfig(n_features=meta["n_features"], dec_bias=meta["dec_bias"], backbone="target")
    adapter_dtype = dtype or transcoder["layers.0.W_enc"].dtype
    # base = target = the checkpoint's model: each layer's own MLP becomes its base MLP.
    model = build_adapter_model(hf, hf, cfg, dtype=adapter_dtype, keep_target_mlps=False)
    _copy_into_adapters(model, transcoder, path)
    if target is not None:
        _attach_target_mlps(model, target, dtype or adapter_dtype, device)
    logger.info("loaded reference checkpoint %s: %d layers × %d features, %s", path, model.n_layers,
                model.n_features, adapter_dtype)
    return model


# -- the checkpoint against a target model -------------------------------------------------------------------

_MLP_NAME = re.compile(r"\.mlp\.")


def compare_shared_weights(checkpoint: str | os.PathLike, target_dir: str | os.PathLike) -> dict:
    """How far a reference checkpoint's non-MLP weights (embeddings, attention, norms, head) are from a target's.

    The checkpoint holds the target's own copies of these; a user's target may differ (another dtype, another
    revision). Tensors are read one at a time from the safetensors files and compared in float32. Returns
    ``tensors`` compared, ``max_abs_diff`` and the ``worst`` tensor, ``max_rel_diff`` (a tensor's largest
    difference over its largest magnitude), names only one side has, and both dtypes.
    """
    checkpoint, target_dir = Path(checkpoint), Path(target_dir)
    ours = {n: f for n, f in reference_weight_map(checkpoint).items() if not _MLP_NAME.search(n)}
    theirs = {n: f for n, f in reference_weight_map(target_dir).items() if not _MLP_NAME.search(n)}
    shared = sorted(set(ours) & set(theirs), key=_natural)
    worst, max_abs, max_rel, mismatched = None, 0.0, 0.0, []
    dtypes: dict[str, str | None] = {"checkpoint": None, "target": None}
    for name in shared:
        with safe_open(str(checkpoint / ours[name]), framework="pt") as fa, \
                safe_open(str(target_dir / theirs[name]), framework="pt") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
        dtypes["checkpoint"], dtypes["target"] = _dtype_name(a.dtype), _dtype_name(b.dtype)
        if a.shape != b.shape:
            mismatched.append(f"{name} {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        scale = float(b.float().abs().max()) if b.numel() else 0.0
        if diff > max_abs:
            worst, max_abs = name, diff
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return {"tensors": len(shared) - len(mismatched), "max_abs_diff": max_abs, "max_rel_diff": max_rel, "worst": worst,
            "shape_mismatch": mismatched, "only_in_checkpoint": sorted(set(ours) - set(theirs), key=_natural),
            "only_in_target": sorted(set(theirs) - set(ours), key=_natural), "dtype": dtypes}
