"""Per-feature buffers of the k best entries by (key, location), merged with vectorised torch ops.

The machinery behind both the top-k examples (key = −activation) and the random sample (key = a
pseudo-random number): see worker/collect/stats.py for how keys are chosen and why the result does
not depend on the order of batches or shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_EMPTY_KEY = {torch.float32: float("inf"), torch.float64: float("inf"), torch.int64: torch.iinfo(torch.int64).max}


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a 1-D bool tensor, ascending: ``mask.nonzero().squeeze(1)``.

    On the CPU through numpy, whose ``flatnonzero`` is ~4x faster than torch's single-threaded ``nonzero``
    on the millions of (token, feature) pairs of a collection batch (issue 17); the same int64 indices.
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def positive_indices(x: torch.Tensor) -> torch.Tensor:
    """Indices of the entries > 0 of a contiguous 1-D tensor, ascending (the comparison in numpy too on the CPU,
    where torch's is ~4x slower on one thread; bfloat16, which numpy lacks, stays in torch)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.float16):
        return torch.from_numpy(np.flatnonzero(x.numpy() > 0))
    return flat_nonzero(x.gt(0))


def value_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """Dtype of kept activation values and top-k keys: the activations' own, at least float32."""
    return torch.promote_types(act_dtype, torch.float32)


PREFILTER_FACTOR = 4  # prefilter when candidates exceed this many times k per feature


def _ordered32(key: torch.Tensor) -> torch.Tensor:
    """Keys mapped to int64 in [0, 2^32) preserving order (floats through float32: non-decreasing)."""
    if not key.is_floating_point():
        return key
    i = key.float().view(torch.int32).long()
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i) + (1 << 31)


def _within_batch_k(feature: torch.Tensor, key: torch.Tensor, k: int, n_features: int) -> torch.Tensor:
    """Indices of entries whose key is at most their feature's k-th smallest key in this set.

    One sort of ``feature << 32 | key32``; a superset of each feature's k best (ties and float32
    rounding keep extra entries, never drop one).
    """
    ordered = _ordered32(key)
    srt = torch.sort(feature << 32 | ordered).values
    counts = torch.bincount(feature, minlength=n_features)
    starts = torch.cumsum(counts, 0) - counts
    full = counts >= k
    kth = torch.full((n_features,), _M32, dtype=torch.int64, device=key.device)
    kth[full] = srt[(starts + k - 1)[full]] & _M32
    return flat_nonzero(ordered <= kth.index_select(0, feature))


@dataclass
class KeptExamples:
    """Per-feature buffers of the k best entries by (key, location); ``loc == -1`` = empty.

    While streaming the slots of a row are in no particular order; after :meth:`sort_` (which
    ``collect`` and ``merge`` call) they are in rank order, ascending (key, location), empty last.

    ``data`` holds payload tensors shaped ``[F, k, ...]`` that travel with the entries: ``value`` (the
    activation at the focus token), ``acts`` (the window's activations) and, after ``fill_tokens``,
    ``tokens`` (the window's token ids, -1 outside the sequence).
    """

    key: torch.Tensor  # [F, k]
    loc: torch.Tensor  # [F, k] int64
    data: dict[str, torch.Tensor]

    @classmethod
    def empty(cls, n_features: int, k: int, key_dtype: torch.dtype, window: int, act_dtype: torch.dtype,
              device: torch.device | str) -> KeptExamples:
        return cls(
            key=torch.full((n_features, k), _EMPTY_KEY[key_dtype], dtype=key_dtype, device=device),
            loc=torch.full((n_features, k), -1, dtype=torch.int64, device=device),
            data={"value": torch.zeros(n_features, k, dtype=value_dtype(act_dtype), device=device),
                  "acts": torch.zeros(n_features, k, window, dtype=act_dtype, device=device)},
        )

    @property
    def k(self) -> int:
        return self.key.shape[1]

    def to(self, device: torch.device | str) -> KeptExamples:
        return KeptExamples(self.key.to(device), self.loc.to(device), {n: t.to(device) for n, t in self.data.items()})

    def clone(self) -> KeptExamples:
        return KeptExamples(self.key.clone(), self.loc.clone(), {n: t.clone() for n, t in self.data.items()})

    def offer(self, feature: torch.Tensor, key: torch.Tensor, locate: Callable[[torch.Tensor], torch.Tensor],
              payload: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
        """Merge candidates (``feature`` and ``key``: 1-D tensors of one length) into the buffers, in place.

        ``locate(idx)`` gives the locations and ``payload(idx)`` the data of candidates ``idx``; both are
        asked only about candidates that pass the thresholds (few, once the buffers are full).

        Slots are not kept in order while streaming: an entering candidate takes the slot of the entry
        it evicts (or an empty one), so only the entering entries' data is written. :meth:`sort_`
        orders every row by (key, location) at the end.
        """
        k = self.k
        if k == 0 or feature.numel() == 0:
            return
        # A candidate can only enter if it is not worse than the feature's worst kept entry (empty slots
        # have the largest key); equal keys are kept: the location decides below.
        worst = self.key.amax(dim=1)
        cand = flat_nonzero(key <= worst.index_select(0, feature))
        if cand.numel() > PREFILTER_FACTOR * k * self.key.shape[0]:
            # Many candidates (a dense batch, or the first ones): only each feature's own k best in
            # this batch can enter, so cut to those with one sort before the exact three-sort merge.
            cand = cand[_within_batch_k(feature[cand], key[cand], k, self.key.shape[0])]
        if cand.numel() == 0:
            return
        feature, key, loc = feature[cand], key[cand], locate(cand)
        rows = torch.unique(feature)  # sorted
        n_rows, dev = rows.numel(), rows.device
        old_loc = self.loc[rows]  # [T, k]
        occupied = old_loc >= 0
        old_row, old_slot = occupied.nonzero(as_tuple=True)
        all_row = torch.cat([old_row, torch.searchsorted(rows, feature)])
        all_key = torch.cat([self.key[rows[old_row], old_slot], key])
        all_loc = torch.cat([old_loc[old_row, old_slot], loc])
        n_old = old_row.numel()
        # Order by (row, key, location): stable sorts from the least to the most significant field; (row, key)
        # in one sort when the key packs into 32 bits without changing its order (the random samples' int
        # keys, float32 top-k keys): two sorts instead of three.
        order = torch.argsort(all_loc, stable=True)
        if all_key.dtype in (torch.int64, torch.float32):
            packed = all_row << 32 | _ordered32(all_key)
            order = order[torch.argsort(packed[order], stable=True)]
        else:
            order = order[torch.argsort(all_key[order], stable=True)]
            order = order[torch.argsort(all_row[order], stable=True)]
        row = all_row[order]
        rank = torch.arange(row.numel(), device=dev) - torch.searchsorted(row, row)
        kept = order[rank < k]
        entering = kept[kept >= n_old] - n_old  # index into this call's candidates, grouped by row
        if entering.numel() == 0:
            return
        # Free slots: empty ones and those of evicted entries (every kept old entry stays where it is).
        free = torch.ones(n_rows, k, dtype=torch.bool, device=dev)
        stay = kept[kept < n_old]
        free[old_row[stay], old_slot[stay]] = False
        free_row, free_slot = free.nonzero(as_tuple=True)  # row-major: grouped by row, ascending
        new_row = all_row[entering + n_old]
        nth = torch.arange(new_row.numel(), device=dev) - torch.searchsorted(new_row, new_row)
        slot = free_slot[torch.searchsorted(free_row, new_row) + nth]
        target_row = rows[new_row]
        self.key[target_row, slot] = key[entering]
        self.loc[target_row, slot] = loc[entering]
        for name, value in payload(cand[entering]).items():
            self.data[name][target_row, slot] = value.to(self.data[name].dtype)

    def sort_(self) -> KeptExamples:
        """Order each feature's entries by (key, location), empty slots last; in place, returns self."""
        by_loc = torch.argsort(self.loc, dim=1, stable=True)
        order = by_loc.gather(1, torch.argsort(self.key.gather(1, by_loc), dim=1, stable=True))
        self.key = self.key.gather(1, order)
        self.loc = self.loc.gather(1, order)
        for name, buf in self.data.items():
            idx = order.view(*order.shape, *([1] * (buf.dim() - 2))).expand_as(buf)
            self.data[name] = buf.gather(1, idx)
        return self
