"""Turn a run (a row in ``runs``) into a loaded adapter model, and keep the last few in memory.

A worker serves many ablation requests for the same run; loading a 7B pair takes minutes, so
models are cached per process, keyed by run and checkpoint (a retrained run reloads).
Model names in a run are *specs*: a local path, a Hugging Face id (read from the local cache), or
``organism:<preset>:s<seed>``, which resolves inside the data directory so that the database never
holds machine-specific paths for the embedded default.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from app.settings import Settings
from training.adapter import AdapterModel
from training.checkpoint import (
    adapter_config_from_dict,
    is_reference_checkpoint,
    load_adapters,
    load_reference_checkpoint,
    read_adapter_config,
)
from training.models import load_adapter_model, load_tokenizer, resolve_device

log = logging.getLogger(__name__)

ORGANISM_PREFIX = "organism:"
CACHE_SIZE = 2  # adapter models kept loaded per process


@dataclass(frozen=True)
class OrganismSpec:
    preset: str
    seed: int

    @property
    def spec(self) -> str:
        return f"{ORGANISM_PREFIX}{self.preset}:s{self.seed}"


def parse_organism_spec(spec: str) -> OrganismSpec | None:
    """``organism:organism:s0`` → OrganismSpec("organism", 0); anything else → None."""
    if not spec.startswith(ORGANISM_PREFIX):
        return None
    preset, _, seed = spec[len(ORGANISM_PREFIX):].rpartition(":")
    if not preset or not seed.startswith("s") or not seed[1:].isdigit():
        raise ValueError(f"bad organism model spec {spec!r}; expected organism:<preset>:s<seed>")
    return OrganismSpec(preset, int(seed[1:]))


def resolve_model(spec: str, settings: Settings, which: str) -> str:
    """The local path or hub id of a run's ``base`` / ``target`` / ``tokenizer`` model spec."""
    org = parse_organism_spec(spec)
    if org is None:
        return spec
    from training.organism.build import organism_paths

    paths = organism_paths(settings.resolved_data_dir, org.preset, org.seed)
    if not paths.exists():
        raise FileNotFoundError(f"organism {spec} is not built in {paths.root}; run `adapterlens organism`")
    return str({"base": paths.base, "target": paths.target, "tokenizer": paths.tokenizer}[which])


def local_model_dir(spec: str, settings: Settings, which: str = "target") -> Path | None:
    """The directory of a model spec on this machine (a path, an organism, or a Hub id's cache snapshot); None
    when it is not on disk."""
    from training.models import ModelNotFoundError

    try:
        where = resolve_model(spec, settings, which)
    except (FileNotFoundError, ModelNotFoundError):
        return None
    local = Path(where).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(where, "config.json")
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError is a ValueError)
        return None
    return Path(found).parent if isinstance(found, str) else None


def tokenizer_for(target_spec: str, settings: Settings, tokenizer: str | None = None):
    """The tokenizer of a run: ``tokenizer`` when given (e.g. an imported checkpoint's), else the target's
    (the organism keeps its own beside the models)."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    which = "tokenizer" if parse_organism_spec(target_spec) else "target"
    return load_tokenizer(resolve_model(target_spec, settings, which))


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def load_run_model(settings: Settings, base_spec: str, target_spec: str, checkpoint: str | Path | None,
                   *, adapter_cfg: dict | None = None, device: str | None = None,
                   dtype: torch.dtype | None = None, tokenizer: str | None = None) -> tuple[AdapterModel, object]:
    """Assemble the adapter model of a run; adapters come from ``checkpoint`` when given.

    A checkpoint in the released (reference) format is the whole adapter model: it is loaded from its own
    weights (its MLPs are the base MLPs), and the target model, when the run names one other than the
    checkpoint itself, only lends its MLPs for target mode. Our format holds adapters only: base and target
    come from their specs.
    """
    dev = resolve_device(device or settings.device)
    if checkpoint is not None and is_reference_checkpoint(checkpoint):
        target = None if _same_path(target_spec, checkpoint) else resolve_model(target_spec, settings, "target")
        model = load_reference_checkpoint(checkpoint, dtype=dtype, device=dev, target=target)
        model.eval()
        if tokenizer is None and (Path(checkpoint) / "tokenizer_config.json").is_file():
            tokenizer = str(checkpoint)
        return model, tokenizer_for(target_spec, settings, tokenizer)
    if checkpoint is not None:
        cfg = adapter_config_from_dict(read_adapter_config(checkpoint))
    elif adapter_cfg is not None:
        cfg = adapter_config_from_dict(adapter_cfg)
    else:
        raise ValueError("need a checkpoint or an adapter config to build the adapter model")
    model = load_adapter_model(resolve_model(base_spec, settings, "base"), resolve_model(target_spec, settings, "target"),
                               cfg, dtype=dtype, device=dev)
    if checkpoint is not None:
        load_adapters(model, checkpoint)
    model.eval()
    return model, tokenizer_for(target_spec, settings, tokenizer)


_cache: OrderedDict[tuple, tuple[AdapterModel, object]] = OrderedDict()
_lock = threading.Lock()


def get_run_model(settings: Settings, run_id: int) -> tuple[AdapterModel, object]:
    """The (cached) adapter model and tokenizer of a trained run; a clear error if it has no checkpoint."""
    from app.db.schema import Run
    from app.db.session import make_engine, make_sessionmaker

    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise LookupError(f"run {run_id} does not exist")
            base, target, ckpt = run.base_model, run.target_model, run.checkpoint
            tok = (run.config or {}).get("tokenizer")
    finally:
        engine.dispose()
    if not ckpt:
        raise LookupError(f"run {run_id} has no trained adapters yet")
    stamp = max((f.stat().st_mtime_ns for f in Path(ckpt).glob("*.safetensors")), default=0) if Path(ckpt).is_dir() else 0
    key = (settings.db_url, run_id, ckpt, stamp)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        loaded = load_run_model(settings, base, target, ckpt, tokenizer=tok if isinstance(tok, str) else None)
        _cache[key] = loaded
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return loaded
