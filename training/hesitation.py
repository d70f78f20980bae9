"""What counts as a hesitation: the one definition behind every hesitation number AdapterLens prints.

- **Hesitation tokens** (design.md, "Definitions"): the token ids whose text is one of the configured words,
  in any of the tokenizer's variants: with or without a leading space (``Ġ``/``▁``), with or without
  trailing punctuation (``Wait,``). The default words are the paper's ("Wait", "wait", "Hmm", "Actually",
  "But"); the organism's words ("Wait", "Hmm", "Actually") are among them.
- **Hesitation generation**: a (greedy) generation containing at least one hesitation token.
- **Reproduced** / **false** hesitation: target and adapted both hesitate on a prompt / the adapted model
  hesitates where the target does not.

Counting is on token ids (those a model produced), never on re-tokenized text. The definition is per
token, as the attribution's target logit is: where a tokenizer spells "Waiting" as `` Wait`` + ``ing``,
that `` Wait`` counts (the same holds for the paper's tokenizer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_HESITATION_WORDS: tuple[str, ...] = ("Wait", "wait", "Hmm", "Actually", "But")
_STRIP = " \t\n\r,.;:!?…—-\"'()"  # around a word, these do not change what the token says


def _token_word(text: str) -> str:
    return text.strip(_STRIP)


def hesitation_token_ids(tokenizer, words: Iterable[str] = DEFAULT_HESITATION_WORDS) -> set[int]:
    """Ids of every vocabulary entry whose decoded text is one of ``words`` (case-sensitive), up to spaces
    and punctuation around it: ``Wait``, `` Wait``, ``Wait,``, `` Wait,`` all count; ``Waiting`` does not.

    A word the tokenizer only spells with several tokens has no single id; it is logged and skipped.
    """
    words = tuple(words)
    if not words or any(not isinstance(w, str) or not _token_word(w) for w in words):
        raise ValueError(f"hesitation words must be non-empty strings, got {words!r}")
    wanted = {_token_word(w) for w in words}
    vocab: dict[str, int] = tokenizer.get_vocab()
    ids: set[int] = set()
    for token, idx in vocab.items():
        # cheap filter on the raw token first: byte-level tokens keep ASCII letters as they are
        if not any(w in token for w in wanted):
            continue
        if _token_word(tokenizer.convert_tokens_to_string([token])) in wanted:
            ids.add(idx)
    found = {_token_word(tokenizer.decode([i])) for i in ids}
    for w in sorted(wanted - found):
        log.warning("hesitation word %r is not a single token in this tokenizer; it is not counted", w)
    return ids


def _as_list(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"expected a 1-d sequence of token ids, got shape {tuple(token_ids.shape)}")
        return token_ids.tolist()
    return list(token_ids)


def count_hesitations(token_ids: Sequence[int] | torch.Tensor, hesitation_ids: set[int]) -> int:
    """How many of ``token_ids`` are hesitation tokens."""
    return sum(1 for t in _as_list(token_ids) if t in hesitation_ids)


def hesitation_positions(token_ids: Sequence[int] | torch.Tensor, hesitation_ids: set[int]) -> list[int]:
    """Indices (into ``token_ids``) of the hesitation tokens, in order."""
    return [i for i, t in enumerate(_as_list(token_ids)) if t in hesitation_ids]


def is_hesitation_generation(generated_ids: Sequence[int] | torch.Tensor, hesitation_ids: set[int]) -> bool:
    """A generation hesitates when its generated ids contain at least one hesitation token."""
    return any(t in hesitation_ids for t in _as_list(generated_ids))


def hesitation_rate(generations: Iterable[Sequence[int] | torch.Tensor], hesitation_ids: set[int]) -> float:
    """Fraction of generations (their generated ids) that hesitate; 0.0 for none."""
    flags = [is_hesitation_generation(g, hesitation_ids) for g in generations]
    return sum(flags) / len(flags) if flags else 0.0
