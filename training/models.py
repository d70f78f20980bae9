"""Loading the model pair: causal LMs and tokenizers from a local directory or the Hugging Face cache.

One seam for "where do weights come from", so the rest of ``training/`` never calls ``from_pretrained``
itself. Two rules shape it:

- ``HF_HUB_OFFLINE`` is respected at call time: a Hub id then resolves from the local cache only, and a
  miss is a :class:`ModelNotFoundError` that names the id, the local path and the cache directory it
  looked in (never a download, never a retry loop against an unreachable server).
- A paper checkpoint (``Qwen2ForCausalLMWithTranscoder``) loads *without error* as a plain Qwen2 through
  ``from_pretrained`` and silently loses its adapters; :func:`load_causal_lm` refuses it and points to
  :func:`training.checkpoint.load_reference_checkpoint`.

Qwen2 is the first-class architecture; Llama/Mistral-shaped decoders (``model.layers[i].mlp`` and
``.post_attention_layernorm``) work too; anything else is a ``TypeError``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from training.adapter import AdapterModel, build_adapter_model, decoder_layers
from training.config import AdapterConfig

logger = logging.getLogger(__name__)

REFERENCE_ARCHITECTURE = "Qwen2ForCausalLMWithTranscoder"
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")  # others load if shaped like these; see check_decoder


class ModelNotFoundError(FileNotFoundError):
    """A model or tokenizer is neither a local directory nor (offline) in the Hugging Face cache."""


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once at import, which tests cannot change)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> str:
    """The Hub cache directory ``from_pretrained`` reads (``HF_HUB_CACHE`` / ``HF_HOME`` respected)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; other names are checked, not trusted."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist; {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _looks_like_path(name: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _where(name: str) -> tuple[Path | None, bool]:
    """(local directory or None, whether to forbid network access) for a name or path."""
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {str(path)!r} does not exist or is not a directory")
        return path, True
    return None, hf_offline()


def _not_found(name: str, what: str, exc: Exception) -> ModelNotFoundError:
    mode = "HF_HUB_OFFLINE is set, so only the cache was searched" if hf_offline() else "download failed"
    return ModelNotFoundError(
        f"{what} {name!r} not found: no local directory {str(Path(name).expanduser().resolve())!r}, and not "
        f"in the Hugging Face cache {hf_cache_dir()!r} ({mode}). Download it first (huggingface-cli download "
        f"{name}) or give a local path. Cause: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )


def _read_architectures(local: Path | None, name: str, offline: bool) -> tuple[list[str], str | None]:
    """(architectures, model_type) from config.json, resolving Hub ids through the cache when offline."""
    if local is not None:
        cfg_file = local / "config.json"
        if not cfg_file.is_file():
            raise ModelNotFoundError(f"model directory {str(local)!r} has no config.json")
        raw = json.loads(cfg_file.read_text())
        return list(raw.get("architectures") or []), raw.get("model_type")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=offline)
    except OSError as exc:
        raise _not_found(name, "model", exc) from exc
    return list(getattr(cfg, "architectures", None) or []), getattr(cfg, "model_type", None)


def check_decoder(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` is a Qwen2/Llama/Mistral-shaped causal LM the adapter can wrap."""
    try:
        decoder_layers(model)
    except TypeError as exc:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise TypeError(
            f"unsupported model {type(model).__name__} (model_type {model_type!r}): {exc}. AdapterLens needs "
            f"a decoder shaped like {', '.join(SUPPORTED_MODEL_TYPES)} (model.layers[i].mlp and "
            f".post_attention_layernorm)"
        ) from None


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   attn_implementation: str | None = None) -> nn.Module:
    """A frozen, eval-mode causal LM from a local directory or a Hub id (the cache only when offline).

    ``dtype`` None keeps the checkpoint's dtype. Refuses paper checkpoints (their adapters would be
    dropped silently) and architectures the adapter cannot wrap.
    """
    from transformers import AutoModelForCausalLM

    name_or_path = str(name_or_path)
    local, offline = _where(name_or_path)
    architectures, _ = _read_architectures(local, name_or_path, offline)
    if REFERENCE_ARCHITECTURE in architectures:
        raise ValueError(
            f"{name_or_path!r} is a transcoder-adapter checkpoint ({REFERENCE_ARCHITECTURE}); loading it as a "
            "plain causal LM would drop its adapters. Use training.checkpoint.load_reference_checkpoint"
        )
    device = resolve_device(device)
    kwargs: dict = {"local_files_only": offline}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local) if local else name_or_path, **kwargs)
    except OSError as exc:
        raise _not_found(name_or_path, "model", exc) from exc
    except ValueError as exc:  # "Unrecognized configuration class ..." for non-causal-LM checkpoints
        raise TypeError(f"{name_or_path!r} is not a causal LM transformers can load: {exc}") from exc
    check_decoder(model)
    model.requires_grad_(False)
    logger.info("loaded %s (%s, %s) on %s", name_or_path, type(model).__name__,
                next(model.parameters()).dtype, device)
    return model.to(device).eval()


TOKENIZER_PROBE = "Wait, 12 + 345 = 357.\n  Hmm: café — ok?"  # digits, spaces, newline, non-ASCII


def _tokenizer_json(local: Path | None, name: str, offline: bool) -> Path | None:
    """The ``tokenizer.json`` a tokenizer was loaded from, when it is on disk."""
    if local is not None:
        found = local / "tokenizer.json"
        return found if found.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "tokenizer.json")
    except ValueError:
        return None
    return Path(cached) if isinstance(cached, str) else None


def load_tokenizer(name_or_path: str):
    """The tokenizer beside a model, with the same resolution and errors as :func:`load_causal_lm`.

    Faithful to the saved ``tokenizer.json``: transformers 5 builds the tokenizer class of the model type
    (a ``Qwen2Tokenizer`` for any qwen2 model), which re-creates its own pre-tokenizer and can split text
    otherwise than the file the user saved (a custom BPE: digits one by one). When the two disagree on a
    probe text, the file's own tokenizer is used (``PreTrainedTokenizerFast``), as the web pages do.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name_or_path = str(name_or_path)
    local, offline = _where(name_or_path)
    where = str(local) if local else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline)
    except OSError as exc:
        raise _not_found(name_or_path, "tokenizer", exc) from exc
    file = _tokenizer_json(local, name_or_path, offline)
    if file is None:
        return tokenizer
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(file))
    if tokenizer(TOKENIZER_PROBE)["input_ids"] == raw.encode(TOKENIZER_PROBE).ids and \
            len(tokenizer) == raw.get_vocab_size(with_added_tokens=True):
        return tokenizer
    logger.warning("%s: transformers' %s tokenizes otherwise than the saved tokenizer.json (or adds tokens); "
                   "using tokenizer.json as saved", name_or_path, type(tokenizer).__name__)
    return PreTrainedTokenizerFast.from_pretrained(where, local_files_only=offline)


def load_adapter_model(base: str, target: str, cfg: AdapterConfig, *, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu", adapters_path: str | None = None,
                       keep_target_mlps: bool = True) -> AdapterModel:
    """Load base and target, assemble the adapter model, and load trained adapters when given.

    ``adapters_path``: our checkpoint directory, or a paper checkpoint (its transcoder tensors are used;
    see :func:`training.checkpoint.load_adapters`). Without it the adapters have the paper's silent init.
    """
    base_model = load_causal_lm(base, dtype=dtype, device=device)
    target_model = load_causal_lm(target, dtype=dtype, device=device)
    model = build_adapter_model(base_model, target_model, cfg, dtype=dtype, keep_target_mlps=keep_target_mlps)
    if adapters_path is not None:
        from training.checkpoint import load_adapters

        load_adapters(model, adapters_path)
    return model
