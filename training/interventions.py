"""Per-feature interventions: the one place where adapter activations are edited.

Ablation, steering, experiments and attribution checks all build an :class:`Intervention` and hand it
to the adapter model (``AdapterModel.intervene``); the adapter forward calls :func:`apply_interventions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch

Mode = Literal["zero", "scale", "clamp"]
PositionSpec = Literal["all", "prompt", "generated"] | tuple[int, ...]


@dataclass(frozen=True)
class Intervention:
    """Edit a set of adapter features.

    - ``features``: (layer, feature index) pairs.
    - ``mode``: ``zero`` sets f to 0; ``scale`` multiplies f by ``value`` (steering: value > 1);
      ``clamp`` sets f to ``value`` (steering: a value above the feature's natural activations).
    - ``positions``: ``all``; ``prompt`` / ``generated`` (split at the row's prompt length, which the
      caller gives to ``AdapterModel.intervene``); or explicit logical positions (0 = first real token,
      padding excluded, so left-padded batches behave like single prompts).
    - ``complement``: apply to every feature of the named layers *except* those listed (the
      sufficiency experiment: keep only a feature set's contribution).
    - ``rows``: batch rows it applies to (None = every row), so one batched forward can carry an
      ablated row beside unablated ones (the lockstep generation of ``worker/ablation/generate.py``).
    """

    features: tuple[tuple[int, int], ...]
    mode: Mode = "zero"
    value: float = 0.0
    positions: PositionSpec = "all"
    complement: bool = False
    layers: tuple[int, ...] | None = field(default=None)  # with complement: which layers (None = all)
    rows: tuple[int, ...] | None = None  # batch rows (None = all)

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "scale", "clamp"):
            raise ValueError(f"unknown intervention mode {self.mode!r}; use zero, scale or clamp")
        if not isinstance(self.positions, tuple) and self.positions not in ("all", "prompt", "generated"):
            raise ValueError(f"positions must be all, prompt, generated or a tuple of ints, not {self.positions!r}")
        object.__setattr__(self, "features", tuple((int(a), int(b)) for a, b in self.features))
        if self.rows is not None:
            object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))

    @classmethod
    def zero(cls, features: Iterable[tuple[int, int]], **kw: object) -> Intervention:
        return cls(features=tuple(features), mode="zero", **kw)  # type: ignore[arg-type]

    @cached_property
    def _indices_by_layer(self) -> dict[int, list[int]]:
        """layer → sorted feature indices, computed once: the forward asks for it at every layer and step."""
        by_layer: dict[int, set[int]] = {}
        for lay, i in self.features:
            by_layer.setdefault(lay, set()).add(i)
        return {lay: sorted(idx) for lay, idx in by_layer.items()}

    @cached_property
    def _bounds(self) -> tuple[int, int, int, int]:
        """(min layer, max layer, min index, max index) of ``features``; (0, -1, 0, -1) when empty."""
        if not self.features:
            return 0, -1, 0, -1
        layers = [lay for lay, _ in self.features]
        idx = [i for _, i in self.features]
        return min(layers), max(layers), min(idx), max(idx)

    def outside(self, n_layers: int, n_features: int) -> tuple[int, int] | None:
        """The first listed feature outside ``n_layers`` × ``n_features``, or None; cheap once checked."""
        lo_l, hi_l, lo_i, hi_i = self._bounds
        if lo_l >= 0 and hi_l < n_layers and lo_i >= 0 and hi_i < n_features:
            return None
        return next((lay, i) for lay, i in self.features if not (0 <= lay < n_layers and 0 <= i < n_features))

    def touches_layer(self, layer: int) -> bool:
        if self.complement:
            return self.layers is None or layer in self.layers
        return layer in self._indices_by_layer

    def feature_indices(self, layer: int) -> list[int]:
        return list(self._indices_by_layer.get(layer, ()))

    @cached_property
    def _masks(self) -> dict[tuple, torch.Tensor]:
        """Masks already built, by (kind, layer or batch, size, device): generation asks at every step."""
        return {}

    def column_mask(self, layer: int, n_features: int, device: torch.device) -> torch.Tensor:
        """Boolean [n_features]: the columns this intervention edits at ``layer`` (complement applied)."""
        key = ("cols", layer, n_features, device)
        mask = self._masks.get(key)
        if mask is None:
            idx = self.feature_indices(layer)
            if idx and max(idx) >= n_features:
                raise IndexError(f"feature {max(idx)} out of range for layer {layer} with {n_features} features")
            with torch.inference_mode(False):  # a normal tensor, usable later under autograd too
                mask = torch.zeros(n_features, dtype=torch.bool)
                mask[idx] = True
                mask = (~mask if self.complement else mask).to(device)
            self._masks[key] = mask
        return mask

    def row_mask(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [batch] of the rows this intervention edits, or None for every row."""
        if self.rows is None:
            return None
        key = ("rows", batch, device)
        mask = self._masks.get(key)
        if mask is None:
            if max(self.rows, default=-1) >= batch:
                raise IndexError(f"intervention rows {self.rows} out of range for a batch of {batch}")
            with torch.inference_mode(False):
                mask = torch.zeros(batch, dtype=torch.bool)
                mask[list(self.rows)] = True
                mask = mask.to(device)
            self._masks[key] = mask
        return mask


def _position_mask(
    spec: PositionSpec, position_ids: torch.Tensor, prompt_lengths: torch.Tensor | None
) -> torch.Tensor | None:
    """Boolean mask [batch, seq] of the positions an intervention edits; None means every position."""
    if spec == "all":
        return None
    if isinstance(spec, tuple):
        wanted = torch.tensor(spec, dtype=position_ids.dtype, device=position_ids.device)
        return torch.isin(position_ids, wanted)
    if prompt_lengths is None:
        raise ValueError(f"positions={spec!r} needs the prompt length; pass prompt_lengths to intervene()")
    in_prompt = position_ids < prompt_lengths.to(position_ids.device).view(-1, 1)
    return in_prompt if spec == "prompt" else ~in_prompt


def apply_interventions(
    f: torch.Tensor,
    layer: int,
    interventions: Sequence[Intervention],
    position_ids: torch.Tensor | None,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``f`` [batch, seq, n_features] with this layer's interventions applied (out of place)."""
    for iv in interventions:
        if not iv.touches_layer(layer):
            continue
        n = f.shape[-1]
        cols = iv.column_mask(layer, n, f.device)
        if position_ids is None:
            position_ids = torch.arange(f.shape[1], device=f.device).expand(f.shape[0], -1)
        pos = _position_mask(iv.positions, position_ids, prompt_lengths)
        mask = cols.view(1, 1, n) if pos is None else pos.unsqueeze(-1) & cols.view(1, 1, n)
        rows = iv.row_mask(f.shape[0], f.device)
        if rows is not None:
            mask = mask & rows.view(-1, 1, 1)
        if iv.mode == "scale":
            f = torch.where(mask, f * iv.value, f)
        else:  # zero or clamp: one kernel, exact values
            f = f.masked_fill(mask, 0.0 if iv.mode == "zero" else iv.value)
    return f
