"""The ``import`` job kind: register a run from adapters trained elsewhere, so collect/attribute need no training.

The paper's five released checkpoints (``nathu0/transcoder-adapters-R1-Distill-Qwen-7B-…``) are whole
``Qwen2ForCausalLMWithTranscoder`` models; a checkpoint in our own format (``adapters.safetensors`` +
``adapter_config.json``) imports the same way. The handler checks the checkpoint (fully, by loading it
with :func:`training.checkpoint.load_reference_checkpoint`, or only its tensor names and shapes), checks
its geometry against the target model's ``config.json`` when that is on disk, and writes one run row
with status ``trained`` whose ``checkpoint`` is the directory: the collect, attribute, ablate and
evaluate handlers load it through ``worker.models_cache.load_run_model`` like any trained run (its
transcoder tensors become the adapters; base and target come from the run's model specs).

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
    from training.models import ModelNotFoundError
    from worker.models_cache import resolve_model

    try:
        where = resolve_model(spec, settings, "target")
    except (FileNotFoundError, ModelNotFoundError):
        return None
    local = Path(where).expanduser()
    if local.is_dir():
        cfg = local / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(where, "config.json")
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError is a ValueError)
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def check_against_target(meta: dict, target_spec: str, settings: Settings) -> bool:
    """Raise ValueError if the target on disk has another depth or width; False when it is not on disk yet."""
    cfg = _model_config(target_spec, settings)
    if cfg is None:
        log.warning("target %s is not on disk yet: its geometry is unchecked, and collect/attribute will need it "
                    "(huggingface-cli download %s)", target_spec, target_spec)
        return False
    have = {"n_layers": cfg.get("num_hidden_layers"), "d_model": cfg.get("hidden_size")}
    bad = [f"{k}: checkpoint {meta[k]}, target {v}" for k, v in have.items() if v is not None and int(v) != int(meta[k])]
    if bad:
        raise ValueError(f"the checkpoint does not fit target {target_spec!r} ({'; '.join(bad)})")
    return True


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
    # Ours records the model names; a reference config.json's _name_or_path may be the authors' local path.
    recorded = meta if fmt != "reference" else {}
    base = p.base_model or recorded.get("base_model")
    target = p.target_model or recorded.get("target_model")
    if not base or not target:
        raise ValueError(f"checkpoint {p.path!r} ({fmt} format) does not record its base and target models; give "
                         f"both (for the paper's release: base {PAPER_BASE!r}, target {PAPER_TARGET!r})")

    ctx.progress(1, 3, f"verifying ({p.verify})")
    check_tensor_shapes(path, meta)
    if p.verify == "full" and fmt == "reference":
        from training.checkpoint import load_reference_checkpoint

        model = load_reference_checkpoint(path, device="cpu")  # every tensor present, named and shaped right
        del model
    ctx.check()
    target_checked = check_against_target(meta, target, settings)

    name = p.name or default_run_name(p.path)
    tokenizer_dir = str(path) if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file() else None
    config = {
        "adapter": {"n_features": int(meta["n_features"]), "dec_bias": bool(meta.get("dec_bias", True)),
                    "backbone": meta.get("backbone", "target")},
        "imported": {"source": p.path, "path": str(path), "format": fmt, "verify": p.verify,
                     "target_checked": target_checked, "l1": l1_from_name(p.path),
                     "dtype": meta.get("dtype")},
        "preset": "imported",
    }
    if tokenizer_dir:
        config["tokenizer"] = tokenizer_dir
    values = {"base_model": base, "target_model": target, "config": config, "status": "trained",
              "checkpoint": str(path), "n_layers": int(meta["n_layers"]), "n_features": int(meta["n_features"]),
              "d_model": int(meta["d_model"])}
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
            "target_model": target, "target_checked": target_checked}
