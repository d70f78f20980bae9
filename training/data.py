"""Token-sequence datasets for adapter training: lists of token ids in, padded batches out.

Text is tokenized once, with the *target's* tokenizer (the adapter model reads the target's tokens), and
kept as ids. Batches are right-padded with an attention mask; the losses average over real tokens only.
Shuffling is a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from training.jsonl import read_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenDataset:
    """Sequences of token ids (each non-empty) and the id used to pad them (masked, so any valid id works)."""

    sequences: tuple[tuple[int, ...], ...]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @classmethod
    def from_token_lists(cls, sequences: Iterable[Sequence[int]], pad_id: int = 0) -> TokenDataset:
        """Validate and freeze a list of token-id lists; empty sequences are an error."""
        out = []
        for n, seq in enumerate(sequences):
            ids = tuple(int(t) for t in seq)
            if not ids:
                raise ValueError(f"sequence {n} is empty")
            if min(ids) < 0:
                raise ValueError(f"sequence {n} has a negative token id {min(ids)}")
            out.append(ids)
        if not out:
            raise ValueError("the dataset has no sequences")
        return cls(tuple(out), int(pad_id))

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, *, add_special_tokens: bool = True,
                   where: str = "texts") -> TokenDataset:
        """Texts tokenized with ``tokenizer`` (the target's); texts that tokenize to nothing are skipped.

        The pad id is the tokenizer's pad token, else its eos token, else 0.
        """
        ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        kept = [s for s in ids if len(s) > 0]
        if len(kept) < len(ids):
            log.warning("%s: skipped %d texts that tokenized to nothing", where, len(ids) - len(kept))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls.from_token_lists(kept, pad_id=pad if pad is not None else 0)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, *, text_field: str = "text",
                   add_special_tokens: bool = True) -> TokenDataset:
        """One JSON object per line with a ``text_field`` string, tokenized with ``tokenizer`` (the target's).

        Blank lines are skipped; a line that is not JSON or lacks the field is a ValueError naming the line.
        """
        return cls.from_texts(read_texts(path, text_field), tokenizer, add_special_tokens=add_special_tokens,
                              where=str(path))


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The ``text_field`` strings of a JSONL file, in order (a ValueError names a line without one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training data file not found: {path}")
    texts = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row.get(text_field), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string {text_field!r} field")
        texts.append(row[text_field])
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def heldout_indices(n: int, *, fraction: float, max_n: int | None = None, seed: int = 0) -> list[int]:
    """Which of ``n`` texts are held out for evaluation: a seeded random ``fraction`` (at least one when
    ``n`` ≥ 2, at most ``max_n``), sorted. A pure function of its arguments, so training and evaluation
    (different jobs, maybe different machines) agree on the split."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0 or n < 2:
        return []
    k = max(1, round(fraction * n))
    k = min(k, n - 1, max_n if max_n is not None else n)
    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def as_dataset(data: TokenDataset | Sequence[Sequence[int]]) -> TokenDataset:
    """Accept a TokenDataset or a plain list of token-id lists."""
    if isinstance(data, TokenDataset):
        return data
    if isinstance(data, str | Path):
        raise ValueError(f"got a path ({data}); load it with TokenDataset.from_jsonl(path, tokenizer) first")
    return TokenDataset.from_token_lists(data)


def collate(sequences: Sequence[Sequence[int]], pad_id: int = 0,
            max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [batch, longest], right-padded; sequences truncated to ``max_len``."""
    rows = [list(s[:max_len] if max_len else s) for s in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of ``range(n)`` used in ``epoch``: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq], 1 = real token
    epoch: int
    index: int  # batch number within the epoch


def iterate_batches(dataset: TokenDataset, batch_size: int, *, seed: int, max_len: int | None = None,
                    start_epoch: int = 0, start_index: int = 0) -> Iterator[Batch]:
    """Endless stream of batches, epoch after epoch, starting at (``start_epoch``, ``start_index``).

    The last batch of an epoch may be smaller. Resuming at a position yields exactly the batches an
    uninterrupted run would have produced from there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, not {batch_size}")
    n = len(dataset)
    per_epoch = batches_per_epoch(n, batch_size)
    epoch, index = start_epoch, start_index
    while True:
        order = epoch_order(n, seed, epoch)
        while index < per_epoch:
            picked = [dataset.sequences[j] for j in order[index * batch_size:(index + 1) * batch_size]]
            ids, mask = collate(picked, dataset.pad_id, max_len)
            yield Batch(ids, mask, epoch, index)
            index += 1
        epoch, index = epoch + 1, 0
