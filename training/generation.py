"""Batched generation that keeps token ids: the one way every part of AdapterLens samples text.

Prompts are left-padded so that every row's next token sits in the last column; generation stops at
``eos``. The result keeps the prompt's and the generated token ids exactly as the model saw and produced
them: downstream code (hesitation counts, regions, per-token KL) works on these ids and never
re-tokenizes decoded text. Works for a plain Hugging Face causal LM and for an
:class:`~training.adapter.AdapterModel` (whose ``generate`` is Hugging Face's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One prompt's result. ``generated_ids`` ends with ``eos`` when the model stopped (``finished``)."""

    prompt: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str  # the generated ids decoded, eos and padding left out
    finished: bool

    @property
    def token_ids(self) -> list[int]:
        """Prompt and generation together, as one sequence."""
        return self.prompt_ids + self.generated_ids


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def padded_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids below ``vocab_size`` that are no token of ``tokenizer``: models pad their vocabulary past the
    tokenizer's size (152,064 rows for 151,665 tokens), and those rows are never text. Generation never
    picks them, and no list shown to a person names them."""
    real = set(tokenizer.get_vocab().values())
    return [i for i in range(int(vocab_size)) if i not in real]


def token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: True where the id is a token of ``tokenizer`` (False on padded ids)."""
    mask = torch.ones(int(vocab_size), dtype=torch.bool)
    pad = padded_ids(tokenizer, vocab_size)
    if pad:
        mask[pad] = False
    return mask


def model_vocab_size(model: nn.Module) -> int:
    """Rows of the model's output head (``config.vocab_size``)."""
    return int(model.config.vocab_size)


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
             add_special_tokens: bool = True) -> list[Generation]:
    """Generate a continuation for each prompt (greedy by default), in batches of ``batch_size``.

    ``seed`` fixes sampling (``greedy=False``) without touching the caller's global RNG state.
    ``add_special_tokens`` prepends the tokenizer's ``bos`` as training did. Padded vocabulary ids
    (:func:`padded_ids`) are never generated.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not a single string")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token; generation could not stop")
    device = _device_of(model)
    suppress = padded_ids(tokenizer, model_vocab_size(model))
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    for p, ids in zip(prompts, encoded, strict=True):
        if not ids:
            raise ValueError(f"prompt {p!r} tokenizes to nothing")
    results: list[Generation] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = encoded[start:start + batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):  # left padding
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    mask[row, width - len(ids):] = 1
                kwargs = {"do_sample": not greedy, "max_new_tokens": max_new_tokens,
                          "pad_token_id": pad_id, "eos_token_id": eos_id}
                if not greedy:
                    kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
                else:
                    kwargs.update(temperature=None, top_k=None, top_p=None)
                if suppress:
                    kwargs["suppress_tokens"] = suppress
                with torch.no_grad():
                    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
                new = out[:, width:].tolist()
                for row, ids in enumerate(chunk):
                    gen = new[row]
                    finished = eos_id in gen
                    gen = gen[:gen.index(eos_id) + 1] if finished else gen
                    shown = gen[:-1] if finished else gen
                    text = tokenizer.decode(shown, skip_special_tokens=False) if shown else ""
                    results.append(Generation(prompts[start + row], list(ids), gen, text, finished))
    finally:
        model.train(was_training)
    return results
