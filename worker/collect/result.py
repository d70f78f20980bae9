"""What a collection produces: per-layer :class:`FeatureStats` plus the weight-only views, mergeable
across shards and saveable, so shard jobs on several workers can hand their parts to one merge job."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from training.chat import REGION_NAMES
from worker.collect.kept import KeptExamples
from worker.collect.lens import LayerLens, LayerNeighbours
from worker.collect.stats import KEPT, N_QUANTILE_BANDS, FeatureStats, merge, unpack_loc

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: quantile-band examples
QUANTILE_RANK_STRIDE = 100  # a quantile example's rank = band * stride + its place in the band


@dataclass
class ExampleWindow:
    """One kept example, trimmed to the part of the window inside its sequence."""

    kind: str  # "top" | "random" | "quantile"
    rank: int  # quantile: band * QUANTILE_RANK_STRIDE + place within the band
    sequence: int
    position: int
    token_ids: list[int]
    acts: list[float]
    focus: int  # index of the selected token in token_ids
    value: float  # activation at the focus token


@dataclass
class CollectionResult:
    """Per-layer accumulators (on the CPU) and, when computed, logit lens and decoder neighbours.

    ``shards`` lists the ``(i, n)`` parts of the corpus it covers: ``[(0, 1)]`` for a whole pass,
    ``[(i, n)]`` for shard i of n, and the union after :func:`merge_results`.
    """

    stats: dict[int, FeatureStats]
    lens: dict[int, LayerLens] | None = None
    neighbours: dict[int, LayerNeighbours] | None = None
    n_sequences: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.stats)

    @property
    def shards(self) -> list[tuple[int, int]]:
        return list(next(iter(self.stats.values())).shards) if self.stats else []

    @property
    def complete(self) -> bool:
        """Whether every shard of the split is in (always true for a whole pass)."""
        shards = self.shards
        return bool(shards) and len(shards) == shards[0][1]

    def summary(self) -> dict:
        """Corpus totals and per-layer figures for a run or job record (plain JSON-able values).

        ``region_tokens`` / ``think_tokens`` are what region counts and thinking-position histograms
        of single features are normalised by; ``l0`` is active features per token, ``dead`` the number
        of features that never fired.
        """
        if not self.stats:
            return {"n_sequences": self.n_sequences, "layers": {}}
        first = self.stats[self.layers[0]]
        return {
            "n_sequences": self.n_sequences,
            "n_tokens": int(first.n_tokens),
            "region_tokens": dict(zip(REGION_NAMES, first.region_tokens.tolist(), strict=True)),
            "think_tokens": first.think_tokens.tolist(),
            "shards": [list(x) for x in self.shards],
            "layers": {str(layer): {"l0": float(s.count.sum()) / max(int(s.n_tokens), 1),
                                    "dead": int((s.count == 0).sum())}
                       for layer, s in self.stats.items()},
            "settings": {k: v for k, v in self.meta.items() if k not in ("hist_edges", "think_pos_edges")},
        }

    def examples(self, layer: int, feature: int) -> Iterator[ExampleWindow]:
        """The kept top-k (rank order) and random examples of one feature."""
        s = self.stats[layer]
        for kind, kept in (("top", s.top), ("random", s.random)):
            yield from _windows(kind, kept, feature, s.ctx_before)
        for band in range(N_QUANTILE_BANDS):
            for w in _windows("quantile", s.quantile, feature * N_QUANTILE_BANDS + band, s.ctx_before):
                w.rank = band * QUANTILE_RANK_STRIDE + w.rank
                yield w

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One ``torch.save`` file of plain tensors and numbers (loadable with ``weights_only=True``)."""
        torch.save(self._state(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> CollectionResult:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a collection result of format {FORMAT_VERSION}")
        stats = {}
        for layer, d in state["stats"].items():
            d = dict(d)
            kept = {name: KeptExamples(**d.pop(name)) for name in KEPT}
            d["shards"] = [tuple(x) for x in d["shards"]]
            stats[int(layer)] = FeatureStats(**d, **kept)
        lens = {int(k): LayerLens(**v) for k, v in state["lens"].items()} if state["lens"] is not None else None
        nb = state["neighbours"]
        neighbours = {int(k): LayerNeighbours(**v) for k, v in nb.items()} if nb is not None else None
        return cls(stats, lens, neighbours, state["n_sequences"], state["meta"])

    def _state(self) -> dict:
        def kept(k: KeptExamples) -> dict:
            return {"key": k.key, "loc": k.loc, "data": dict(k.data)}

        stats = {}
        for layer, s in self.stats.items():
            d = {name: getattr(s, name) for name in ("layer", "n_features", "ctx_before", "ctx_after", "seed",
                                                     "n_tokens", "region_tokens", "think_tokens", "count",
                                                     "act_sum", "act_max", "hist", "regions", "think_hist")}
            d.update({name: kept(getattr(s, name)) for name in KEPT}, shards=[list(x) for x in s.shards])
            stats[layer] = d
        return {
            "format": FORMAT_VERSION,
            "stats": stats,
            "lens": {k: asdict(v) for k, v in self.lens.items()} if self.lens is not None else None,
            "neighbours": {k: asdict(v) for k, v in self.neighbours.items()} if self.neighbours is not None else None,
            "n_sequences": self.n_sequences,
            "meta": self.meta,
        }


def merge_results(*results: CollectionResult) -> CollectionResult:
    """Merge shard results (any order) into one; equal to a single pass over their union.

    Shards must be distinct parts of one split (same n); lens and neighbours come from whichever
    result carries them (they depend on weights only). Merging fewer than n shards is allowed (a
    partial result, ``complete`` is False) and can be merged again later.
    """
    if not results:
        raise ValueError("merge_results needs at least one result")
    all_shards = [s for r in results for s in r.shards]
    ns = {n for _, n in all_shards}
    if len(ns) > 1:
        raise ValueError(f"results come from different splits of the corpus (n = {sorted(ns)})")
    if len(set(all_shards)) != len(all_shards):
        raise ValueError(f"a shard is in more than one result: {sorted(all_shards)}")
    layer_sets = {tuple(r.layers) for r in results}
    if len(layer_sets) != 1:
        raise ValueError(f"results cover different layers: {sorted(layer_sets)}")
    stats = dict(results[0].stats)
    for r in results[1:]:
        stats = {layer: merge(stats[layer], r.stats[layer]) for layer in stats}
    lens = next((r.lens for r in results if r.lens is not None), None)
    neighbours = next((r.neighbours for r in results if r.neighbours is not None), None)
    out = CollectionResult(stats, lens, neighbours, sum(r.n_sequences for r in results), dict(results[0].meta))
    if not out.complete:
        logger.info("merged shards %s; the result covers part of the corpus", out.shards)
    return out


def _windows(kind: str, kept: KeptExamples, feature: int, ctx_before: int) -> Iterator[ExampleWindow]:
    if "tokens" not in kept.data:
        raise ValueError("token windows are missing; call fill_tokens on the stats first")
    locs = kept.loc[feature]
    for rank in range(kept.k):
        loc = int(locs[rank])
        if loc < 0:
            break
        tokens = kept.data["tokens"][feature, rank]
        inside = tokens >= 0
        first = int(inside.nonzero()[0])
        seq, pos = unpack_loc(torch.tensor(loc))
        yield ExampleWindow(
            kind=kind, rank=rank, sequence=int(seq), position=int(pos),
            token_ids=tokens[inside].tolist(), acts=kept.data["acts"][feature, rank][inside].double().tolist(),
            focus=ctx_before - first, value=float(kept.data["value"][feature, rank]),
        )
