"""The ``import`` job kind: register a run from adapters trained elsewhere, so collect/attribute need no training.

The paper's five released checkpoints (``nathu0/transcoder-adapters-R1-Distill-Qwen-7B-…``) are whole
``Qwen2ForCausalLMWithTranscoder`` models: the target's embeddings, attention, norms and head, the base
MLPs, and the adapters. Such a checkpoint *is* the adapter model, and the run is built from its own
weights (``worker.models_cache.load_run_model``); nothing else needs naming to collect features,
attribute or ablate. ``--target`` names the target model itself, needed only where the target runs
(evaluation, the hesitation study's traces): its MLPs serve target mode, and its other weights are
compared with the checkpoint's copies (the result says by how much: a float32 target against a bf16
checkpoint differs by bf16 rounding). ``--base`` only adds the base model's row to the evaluation.

A checkpoint in our own format (``adapters.safetensors`` + ``adapter_config.json``) holds adapters only and
records its base and target, which the run then loads. The handler checks the checkpoint (fully, by
loading it with :func:`training.checkpoint.load_reference_checkpoint`, or only its tensor names and
shapes), checks its geometry against the target's ``config.json`` when that is on disk, and writes one
run row with status ``trained`` whose ``checkpoint`` is the directory.

Idempotent: importing the same name again updates the run in place (a re-run never duplicates).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import select

from app.db.schema import Run
from app.settings import Settings
from worker.handlers import JobContext, register

log = logging.getLogger(__name__)

# What a released repo holds besides the weights (features/, classifications/ …) is not fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
PAPER_BASE = "Qwen/Qwen2.5-Math-7B"
PAPER_TARGET = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
_L1_IN_NAME = re.compile(r"l1w([0-9.eE+-]+?)(?:-|$)")


class ImportPayload(BaseModel):
    path: str = Field(description="checkpoint directory, or a Hugging Face repo id (read from the HF cache; "
                                  "downloaded unless HF_HUB_OFFLINE=1)")
    base_model: str | None = Field(None, description="base (MLP donor) model spec; default: the checkpoint's record")
    target_model: str | None = Field(None, description="target model spec; default: the checkpoint's record")
    name: str | None = Field(None, description="run name (default: from the path)")
    verify: Literal["full", "tensors"] = Field(
        "full", description="full: load a reference checkpoint once (catches every missing or mis-shaped tensor); "
                            "tensors: check adapter names and shapes from the file headers only (fast, little "
                            "memory; all that is done for our format, which holds adapters only)")


def resolve_checkpoint_path(path: str) -> Path:
    """A local directory as is; ``org/name`` through the Hugging Face cache (weights and config only)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint {path!r} is not a directory (and not a Hugging Face repo id)")
    from huggingface_hub import snapshot_download

    from training.models import hf_cache_dir, hf_offline

    try:
        return Path(snapshot_download(path, allow_patterns=HUB_PATTERNS, local_files_only=hf_offline()))
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not there"
        mode = "HF_HUB_OFFLINE is set, so only the cache was searched" if hf_offline() else "download failed"
        raise FileNotFoundError(
            f"checkpoint {path!r} is neither a local directory nor in the Hugging Face cache {hf_cache_dir()!r} "
            f"({mode}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Fetch it with "
            f"`huggingface-cli download {path}` or give a local path") from exc


def _header_shapes(path: Path, meta: dict) -> dict[str, tuple[int, ...]]:
    """Adapter tensor shapes (our names) read from safetensors headers, without loading any tensor."""
    from safetensors import safe_open

    from training.checkpoint import (
        ADAPTERS_FILE,
        _is_transcoder_name,
        _reference_to_ours,
        reference_weight_map,
    )

    shapes: dict[str, tuple[int, ...]] = {}
    if meta.get("format") == "reference":
        by_file: dict[str, list[str]] = {}
        for name, fname in reference_weight_map(path).items():
            if _is_transcoder_name(name):
                by_file.setdefault(fname, []).append(name)
        for fname, names in by_file.items():
            with safe_open(str(path / fname), framework="pt") as fh:
                for name in names:
                    shapes[_reference_to_ours(name)] = tuple(fh.get_slice(name).get_shape())
        return shapes
    file = path / ADAPTERS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"adapter checkpoint {str(path)!r} has no {ADAPTERS_FILE}")
    with safe_open(str(file), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def check_tensor_shapes(path: Path, meta: dict) -> None:
    """Every layer's W_enc [F, d], b_enc [F], W_dec [d, F] (and b_dec [d]) present with these shapes."""
    L, d, F = int(meta["n_layers"]), int(meta["d_model"]), int(meta["n_features"])
    want = {}
    for i in range(L):
        want |= {f"layers.{i}.W_enc": (F, d), f"layers.{i}.b_enc": (F,), f"layers.{i}.W_dec": (d, F)}
        if meta.get("dec_bias", True):
            want[f"layers.{i}.b_dec"] = (d,)
    have = _header_shapes(path, meta)
    missing = sorted(set(want) - set(have))
    wrong = [f"{k} {have[k]} (expected {v})" for k, v in want.items() if k in have and have[k] != v]
    if missing or wrong:
        raise ValueError(f"adapter checkpoint {str(path)!r} is incomplete or mis-shaped: missing "
                         f"{missing[:6]}{' …' if len(missing) > 6 else ''}; wrong shapes {wrong[:6]}")


def _model_config(spec: str, settings: Settings) -> dict | None:
    """The target's config.json when it is on disk (a directory, an organism, or the HF cache); else None."""
    from worker.models_cache import local_model_dir

    where = local_model_dir(spec, settings, "target")
    cfg = where / "config.json" if where is not None else None
    return json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else None


def check_against_target(meta: dict, target_spec: str, settings: Settings) -> bool:
    """Raise ValueError if the target on disk has another depth or width; False when it is not on disk yet."""
    cfg = _model_config(target_spec, settings)
    if cfg is None:
        log.warning("target %s is not on disk yet: its geometry is unchecked, and evaluation and the hesitation "
                    "study will need it (huggingface-cli download %s)", target_spec, target_spec)
        return False
    have = {"n_layers": cfg.get("num_hidden_layers"), "d_model": cfg.get("hidden_size")}
    bad = [f"{k}: checkpoint {meta[k]}, target {v}" for k, v in have.items() if v is not None and int(v) != int(meta[k])]
    if bad:
        raise ValueError(f"the checkpoint does not fit target {target_spec!r} ({'; '.join(bad)})")
    return True


def target_agreement(path: Path, target_spec: str, settings: Settings) -> dict | None:
    """How far the target's non-MLP weights are from the checkpoint's copies (None: target not on disk)."""
    from training.checkpoint import compare_shared_weights
    from worker.models_cache import local_model_dir

    where = local_model_dir(target_spec, settings, "target")
    if where is None:
        return None
    try:
        out = compare_shared_weights(path, where)
    except FileNotFoundError as exc:  # a target without safetensors weights
        log.warning("could not compare the target's weights with the checkpoint's: %s", exc)
        return None
    if out["shape_mismatch"] or out["max_rel_diff"] > 1e-2:
        log.warning("the target %s differs from the checkpoint's copy of its weights: max |Δ| %.3g (relative %.3g, "
                    "%s)%s; the adapter model uses the checkpoint's", target_spec, out["max_abs_diff"],
                    out["max_rel_diff"], out["worst"], f"; shapes differ: {out['shape_mismatch'][:3]}"
                    if out["shape_mismatch"] else "")
    return out


def l1_from_name(name: str) -> float | None:
    """λ_L1 from a released repo name (``…-l1w0.001-l0-1.4`` → 0.001); None when the name does not say."""
    m = _L1_IN_NAME.search(name)
    if not m:
        return None
    try:
        return float(m.group(1))
    except ValueError:
        return None


def default_run_name(path: str) -> str:
    return path.rstrip("/").split("/")[-1] or "imported"


@register("import", ImportPayload)
def import_job(ctx: JobContext) -> dict:
    """Verify a released/reference (or our-format) checkpoint and register it as a trained run."""
    from training.checkpoint import read_adapter_config

    p: ImportPayload = ctx.payload
    settings = ctx.job_settings()
    ctx.progress(0, 3, "resolving the checkpoint")
    path = resolve_checkpoint_path(p.path)
    meta = read_adapter_config(path)
    fmt = meta.get("format", "adapterlens")
    reference = fmt == "reference"
    # Ours records the model names; a reference config.json's _name_or_path may be the authors' local path.
    recorded = meta if not reference else {}
    base = p.base_model or recorded.get("base_model")
    target = p.target_model or recorded.get("target_model")
    if not reference and (not base or not target):
        raise ValueError(f"checkpoint {p.path!r} ({fmt} format: adapters only) does not record its base and target "
                         "models; give both")
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    if reference and not target and not has_tokenizer:
        raise ValueError(f"checkpoint {p.path!r} has no tokenizer: give its target model (--target; for the paper's "
                         f"release {PAPER_TARGET!r}, base {PAPER_BASE!r})")

    ctx.progress(1, 3, f"verifying ({p.verify})")
    check_tensor_shapes(path, meta)
    if p.verify == "full" and reference:
        from training.checkpoint import load_reference_checkpoint

        model = load_reference_checkpoint(path, device="cpu")  # every tensor present, named and shaped right
        del model
    ctx.check()
    target_checked = check_against_target(meta, target, settings) if target else False
    agreement = target_agreement(path, target, settings) if target and reference else None

    name = p.name or default_run_name(p.path)
    config = {
        "adapter": {"n_features": int(meta["n_features"]), "dec_bias": bool(meta.get("dec_bias", True)),
                    "backbone": meta.get("backbone", "target")},
        "imported": {"source": p.path, "path": str(path), "format": fmt, "verify": p.verify,
                     "base_model": base, "target_model": target, "target_checked": target_checked,
                     "target_agreement": agreement, "l1": l1_from_name(p.path), "dtype": meta.get("dtype")},
        "preset": "imported",
    }
    if has_tokenizer:
        config["tokenizer"] = str(path)
    chat = _chat_format(path if has_tokenizer else None, target, settings)
    if chat is not None:
        config["chat"] = chat
    values = {"base_model": base or str(path), "target_model": target or str(path), "config": config,
              "status": "trained", "checkpoint": str(path), "n_layers": int(meta["n_layers"]),
              "n_features": int(meta["n_features"]), "d_model": int(meta["d_model"])}
    with ctx.session() as s:
        run = s.scalar(select(Run).where(Run.name == name))
        if run is None:
            run = Run(name=name, **values)
            s.add(run)
        else:
            for key, value in values.items():
                setattr(run, key, value)
        s.flush()
        run_id = run.id
    ctx.progress(3, 3, "registered")
    log.info("imported %s as run %d (%s): %d layers × %d features", p.path, run_id, name, meta["n_layers"],
             meta["n_features"])
    return {"run_id": run_id, "name": name, "checkpoint": str(path), "format": fmt, "base_model": base,
            "target_model": target, "target_checked": target_checked, "target_agreement": agreement,
            "weights": "the checkpoint's own (target weights with base MLPs, adapters)" if reference else
            "base and target from their specs, adapters from the checkpoint"}


def _chat_format(tokenizer_dir: Path | None, target: str | None, settings: Settings) -> dict | None:
    """The chat format the run keeps, from the checkpoint's tokenizer or the target's (None: neither on disk)."""
    from training.models import ModelNotFoundError, load_tokenizer
    from worker.models_cache import local_model_dir
    from worker.run_data import tokenizer_chat_format

    where = tokenizer_dir or (local_model_dir(target, settings, "tokenizer" if target.startswith("organism:")
                                              else "target") if target else None)
    if where is None:
        return None
    try:
        return tokenizer_chat_format(load_tokenizer(str(where)), str(where)).to_config()
    except (OSError, ModelNotFoundError, ValueError) as exc:
        log.warning("no chat format from %s (%s); the run uses the default format", where, exc)
        return None
