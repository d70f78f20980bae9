"""Streaming per-feature accumulators for one layer, updated on the device and merged exactly.

Every statistic is computed from the *sparse* list of nonzero activations of a batch
(``(row, position, feature, value)`` from one ``nonzero`` over ``f > 0``), so the cost of an update
scales with the number of active (token, feature) pairs, not with tokens × features: with a trained
adapter (L0 of 1–10 per token) that is a few thousand entries per batch and layer.

Kept examples (top-k and random) live in fixed-size per-feature buffers ``[F, k]`` holding the k
smallest keys, ties broken by location (sequence id, then position), so the result never depends on
the order in which batches or shards arrive:

- top-k: key = −activation (the largest activations first; equal activations → earlier location);
- random: key = a pseudo-random 32-bit number from (seed, layer, feature, location) (a per-token hash
  XOR a per-feature salt, :func:`sample_keys`); keeping the k smallest keys is a uniform random k-subset
  of the feature's nonzero occurrences (bottom-k sampling, equivalent to reservoir sampling). Because a
  key depends only on the occurrence and the seed, the union of two shards' bottom-k sets contains the
  bottom-k of the whole corpus: shard + merge gives *exactly* the one-pass sample, where weighted
  reservoir merging by counts would give it only in distribution.

A buffer update is vectorised: candidates are filtered against each feature's current k-th key (and,
when a batch brings many per feature, against the feature's own k-th key in the batch, found with one
sort), then the touched rows and the candidates are ordered by (feature, key, location) with three
stable sorts, and entering candidates take the slots of the entries they evict (only their window
data is written). No Python loop runs per feature or token.

Cost per batch and layer: one ``nonzero`` over f [rows, seq, F] and a few dozen elementwise passes over
the nonzero entries; on a GPU a handful of host syncs (each ``nonzero``/``unique``).

With each kept example the accumulator stores that feature's activations over the context window
``[pos - ctx_before, pos + ctx_after]`` (cut from the batch's activations while they are on the
device), so memory stays ``O(F × (k_top + k_random) × window)`` per layer, independent of the corpus
size, and no second forward pass is needed. Token ids of the windows are filled in from the corpus at
the end (:meth:`FeatureStats.fill_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from training.chat import REGION_NAMES
from worker.collect.kept import KeptExamples, flat_nonzero, positive_indices, value_dtype

# Locations pack (sequence id, position) into one int64: sequences up to 2^24 tokens, 2^39 sequences.
POS_BITS = 24
POS_MASK = (1 << POS_BITS) - 1

# Activation histogram: fixed log-spaced bins so histograms of shards merge by addition.
# Bin 0 is (0, 1e-3); bins 1..50 are [10^(-3 + (i-1)/10), 10^(-3 + i/10)); the last is [1e2, ∞).
# Values are compared with the edges rounded to the activations' value dtype (float32 below float64).
HIST_DECADES = (-3, 2)  # log10 of the lowest and highest finite edge
HIST_BINS_PER_DECADE = 10
HIST_EDGES = torch.logspace(HIST_DECADES[0], HIST_DECADES[1],
                            (HIST_DECADES[1] - HIST_DECADES[0]) * HIST_BINS_PER_DECADE + 1, dtype=torch.float64)
N_HIST = HIST_EDGES.numel() + 1
N_REGIONS = len(REGION_NAMES)
N_THINK_BINS = 10  # relative position p in the thinking span → bin min(floor(10 p), 9)
_N_CODES = N_REGIONS * (N_THINK_BINS + 1)  # (region, thinking bin or none) per token

_M32 = 0xFFFFFFFF

# "Across the activation range" (Neuronpedia's quantile examples): a uniform random sample of each feature's
# occurrences *within each activation band*, so low, middle and high activations all get examples. The bands
# are fixed half-decades (known before the pass, so shards merge exactly like the random sample): band 0 is
# (0, 1e-2), band b in 1..8 is [10^(-2 + (b-1)/2), 10^(-2 + b/2)), band 9 is [1e2, ∞).
QUANTILE_LOG10_LOW = -2.0  # log10 of the lowest band edge
QUANTILE_BANDS_PER_DECADE = 2
N_QUANTILE_BANDS = 10
_QUANTILE_SALT = 0x51ED2705  # keeps the band samples' keys independent of the plain random sample's
# Band edges are histogram edges (see band_of_bin): every _BINS_PER_BAND-th, from edge number _BAND_OFFSET.
_BINS_PER_BAND = HIST_BINS_PER_DECADE // QUANTILE_BANDS_PER_DECADE
_BAND_OFFSET = int((QUANTILE_LOG10_LOW - HIST_DECADES[0]) * HIST_BINS_PER_DECADE)
assert _BINS_PER_BAND * QUANTILE_BANDS_PER_DECADE == HIST_BINS_PER_DECADE


_BAND_TABLES: dict[torch.device, torch.Tensor] = {}


def _band_table(device: torch.device) -> torch.Tensor:
    """:func:`band_of_bin` of every histogram bin, for one gather per activation instead of a few passes."""
    if device not in _BAND_TABLES:
        _BAND_TABLES[device] = band_of_bin(torch.arange(N_HIST)).to(device)
    return _BAND_TABLES[device]


def quantile_bands(v: torch.Tensor) -> torch.Tensor:
    """Activation band (0 .. N_QUANTILE_BANDS - 1) of each positive value."""
    return band_of_bin(hist_bins(v))


def band_of_bin(bins: torch.Tensor) -> torch.Tensor:
    """The quantile band of each histogram bin: band edges are every 5th histogram edge from 1e-2, so a value's
    band follows from its bin (one log-spaced binning for both, computed once per activation)."""
    return ((bins - 1 - _BAND_OFFSET).div(_BINS_PER_BAND, rounding_mode="floor") + 1).clamp_(0, N_QUANTILE_BANDS - 1)


def quantile_band_edges() -> list[float]:
    """``N_QUANTILE_BANDS + 1`` edges for display: 0, then the finite edges, then infinity."""
    finite = [10.0 ** (QUANTILE_LOG10_LOW + i / QUANTILE_BANDS_PER_DECADE) for i in range(N_QUANTILE_BANDS - 1)]
    return [0.0, *finite, float("inf")]


def pack_loc(seq: torch.Tensor | int, pos: torch.Tensor | int) -> torch.Tensor | int:
    return (seq << POS_BITS) | pos


def unpack_loc(loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return loc >> POS_BITS, loc & POS_MASK


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply) on int64 tensors holding values in [0, 2^32).

    Multipliers are below 2^31 so every product fits in a signed int64 (no overflow on any backend).
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5A6CA68B) & _M32
    return x ^ (x >> 16)


def token_keys(seed: int, loc: torch.Tensor) -> torch.Tensor:
    """A pseudo-random 32-bit number per location (int64 in [0, 2^32)), the same on every device.

    A multiply-add of (sequence, position) through two rounds of a bijective mixer; two locations
    may collide (equal keys), and the location then decides, so results stay deterministic.
    """
    salt = int(_mix32(torch.tensor((seed * 0x1E3779B1) & _M32)))
    x = (((loc >> POS_BITS) & _M32) * 0x2C1B3C6D + (loc & POS_MASK) * 0x297A2D39 + salt) & _M32
    return _mix32(_mix32(x) ^ salt)


def feature_salts(seed: int, layer: int, n_features: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A pseudo-random 32-bit salt per feature of a layer, [F] int64."""
    x = (torch.arange(n_features, device=device) * 0x5BD1E995 + ((seed * 0x1E3779B1) ^ (layer * 0x2545F491))) & _M32
    return _mix32(_mix32(x) ^ 0x3C6EF372)


def sample_keys(seed: int, layer: int, feature: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Sampling key of each (feature, location): token key XOR feature salt.

    XOR with a constant is a bijection, so for one feature the keys of its occurrences are as uniform
    and independent as the token keys: keeping the k smallest is a uniform k-subset. (Features share
    token keys, so samples of different features are not independent of each other; each is uniform.)
    The token key is computed per token, the per-(token, feature) work is one gather and one XOR.
    """
    n = int(feature.max()) + 1 if feature.numel() else 0
    return token_keys(seed, loc) ^ feature_salts(seed, layer, n, feature.device)[feature]


def hist_edges_for_display() -> list[float]:
    """``N_HIST + 1`` edges, numpy-style: the finite edges plus nominal outer edges one decade out.

    The first bin holds every value in (0, 1e-3) and the last every value >= 1e2; their outer edges
    (1e-4, 1e3) only give those bins a width on a log axis.
    """
    low, high = HIST_DECADES
    return [10.0 ** (low - 1)] + HIST_EDGES.tolist() + [10.0 ** (high + 1)]


def hist_bins(v: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each positive value: the number of edges <= v (``bucketize(right=True)``).

    float32 (every collection's values but float64 models'): two lookups by the top 16 bits of the float (8 of
    exponent, 7 of mantissa: a cell 0.8% wide, against bins 26% wide, so at most one edge falls inside a cell):
    the edges below the cell, plus one if v reaches the edge inside it. ~3x cheaper than the log10 route below,
    which other dtypes take: log10, then corrected by one step against the exact edges (in v's dtype).
    """
    if v.dtype == torch.float32 and v.is_contiguous():
        below, inside = _hist_cells(v.device)
        cell = (v.view(torch.int32) >> 16).long()
        return below.index_select(0, cell) + (v >= inside.index_select(0, cell)).long()
    edges = HIST_EDGES.to(device=v.device, dtype=v.dtype)
    inf = torch.full((1,), float("inf"), device=v.device, dtype=v.dtype)
    padded = torch.cat([-inf, edges, inf * float("nan")])  # padded[b] = edges[b - 1]; nothing reaches the top (NaN)
    guess = ((torch.log10(v) - HIST_DECADES[0]) * HIST_BINS_PER_DECADE).floor_().clamp_(-1, edges.numel() - 1)
    b = guess.long() + 1
    b += (v >= padded.index_select(0, b + 1)).long()
    b -= (v < padded.index_select(0, b)).long()
    return b


_HIST_CELLS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _hist_cells(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell of positive float32 bit patterns (bits >> 16, up to +inf): the number of edges <= the cell's
    smallest value, and the edge inside the cell (NaN where none: no value compares >= NaN)."""
    if device not in _HIST_CELLS:
        edges = HIST_EDGES.float()
        n = (0x7F800000 >> 16) + 1
        first = torch.arange(n, dtype=torch.int32) << 16
        below = torch.bucketize(first.view(torch.float32), edges, right=True)
        nxt = below.clamp(max=edges.numel() - 1)
        edge_bits = edges.view(torch.int32).long()[nxt]
        inside = torch.where((below < edges.numel()) & (edge_bits < (first.long() + (1 << 16))), edges[nxt],
                             torch.tensor(float("nan")))
        _HIST_CELLS[device] = (below.to(device), inside.to(device))
    return _HIST_CELLS[device]


@dataclass
class BatchInfo:
    """What every layer's update needs about the current batch (all [rows, seq] on the device)."""

    valid: torch.Tensor  # bool: a real token (not padding)
    loc: torch.Tensor  # int64: packed (sequence id, position)
    region: torch.Tensor  # int64: Region of the token
    think_bin: torch.Tensor  # int64: bin of the relative thinking position, -1 outside thinking
    lengths: torch.Tensor  # int64 [rows]: real length of each row


@dataclass
class FeatureStats:
    """All accumulators of one layer's F features. Create with :meth:`empty`, feed with :meth:`update`,
    combine shards with :func:`merge`.

    Counts are exact integers; ``act_sum`` is float64 (mean activation = act_sum / count, the mean over
    the tokens where the feature is active, not over all tokens).
    """

    layer: int
    n_features: int
    ctx_before: int
    ctx_after: int
    seed: int
    n_tokens: torch.Tensor  # [] int64: non-padding tokens seen
    region_tokens: torch.Tensor  # [N_REGIONS] int64: tokens seen per region
    think_tokens: torch.Tensor  # [N_THINK_BINS] int64: thinking tokens seen per relative-position bin
    count: torch.Tensor  # [F] int64: tokens with f > 0
    act_sum: torch.Tensor  # [F] float64
    act_max: torch.Tensor  # [F] (value dtype; 0 for a feature that never fired)
    hist: torch.Tensor  # [F, N_HIST] int64
    regions: torch.Tensor  # [F, N_REGIONS] int64: active tokens per region
    think_hist: torch.Tensor  # [F, N_THINK_BINS] int64: active thinking tokens per position bin
    top: KeptExamples
    random: KeptExamples
    quantile: KeptExamples  # rows are (feature, band): row = feature * N_QUANTILE_BANDS + band
    shards: list[tuple[int, int]] = field(default_factory=list)
    _salts: torch.Tensor | None = field(default=None, repr=False)  # feature_salts cache
    _band_salts: torch.Tensor | None = field(default=None, repr=False)  # per (feature, band) row

    @classmethod
    def empty(cls, layer: int, n_features: int, *, top_k: int = 20, n_random: int = 10, n_quantile: int = 2,
              ctx_before: int = 50, ctx_after: int = 20, seed: int = 0, act_dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> FeatureStats:
        w = ctx_before + 1 + ctx_after

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            layer=layer, n_features=n_features, ctx_before=ctx_before, ctx_after=ctx_after, seed=seed,
            n_tokens=zeros(()), region_tokens=zeros(N_REGIONS), think_tokens=zeros(N_THINK_BINS),
            count=zeros(n_features), act_sum=zeros(n_features, dtype=torch.float64),
            act_max=zeros(n_features, dtype=value_dtype(act_dtype)), hist=zeros(n_features, N_HIST),
            regions=zeros(n_features, N_REGIONS), think_hist=zeros(n_features, N_THINK_BINS),
            top=KeptExamples.empty(n_features, top_k, value_dtype(act_dtype), w, act_dtype, device),
            random=KeptExamples.empty(n_features, n_random, torch.int64, w, act_dtype, device),
            quantile=KeptExamples.empty(n_features * N_QUANTILE_BANDS, n_quantile, torch.int64, w, act_dtype, device),
        )

    @property
    def window(self) -> int:
        return self.ctx_before + 1 + self.ctx_after

    @property
    def device(self) -> torch.device:
        return self.count.device

    # -- streaming --------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, f: torch.Tensor, batch: BatchInfo) -> None:
        """Add one batch of activations ``f`` [rows, seq, F] (padding positions are ignored)."""
        if f.shape[-1] != self.n_features:
            raise ValueError(f"layer {self.layer}: activations have {f.shape[-1]} features, expected {self.n_features}")
        valid = batch.valid
        self.n_tokens += valid.sum()
        self.region_tokens += torch.bincount(batch.region[valid], minlength=N_REGIONS)
        tb = batch.think_bin[valid]
        self.think_tokens += torch.bincount(tb[tb >= 0], minlength=N_THINK_BINS)

        # Flat indices and index_select throughout: 1-D gathers are much cheaper than advanced indexing.
        F_, width = self.n_features, f.shape[1]
        f = f.contiguous()
        flat_f = f.view(-1)
        nz = positive_indices(flat_f)
        # token (row * width + position) and feature of each entry; for a power-of-two F (512, 8192) by shift and
        # mask, several times cheaper than int64 division
        shift = F_.bit_length() - 1 if F_ & (F_ - 1) == 0 else None
        tok = nz >> shift if shift is not None else nz // F_
        if not bool(valid.all()):  # padding: few entries once batches are sorted by length
            keep = flat_nonzero(valid.reshape(-1).index_select(0, tok))
            nz, tok = nz.index_select(0, keep), tok.index_select(0, keep)
        if nz.numel() == 0:
            return
        j = nz & (F_ - 1) if shift is not None else nz - tok * F_
        v = flat_f.index_select(0, nz).to(self.act_max.dtype)
        self.act_sum.index_add_(0, j, v.double())
        self.act_max.scatter_reduce_(0, j, v, reduce="amax")
        bins = hist_bins(v)
        hist = torch.bincount(bins.add(j, alpha=N_HIST), minlength=F_ * N_HIST).view(F_, N_HIST)
        self.hist += hist
        self.count += hist.sum(1)
        # Region and thinking-position bin in one code per token: one gather and one bincount.
        code = (batch.region * (N_THINK_BINS + 1) + batch.think_bin + 1).reshape(-1).index_select(0, tok)
        joint = torch.bincount(code.add_(j, alpha=_N_CODES), minlength=F_ * _N_CODES).view(F_, N_REGIONS,
                                                                                            N_THINK_BINS + 1)
        self.regions += joint.sum(2)
        self.think_hist += joint[:, :, 1:].sum(1)

        flat_loc = batch.loc.reshape(-1)
        offsets = torch.arange(-self.ctx_before, self.ctx_after + 1, device=f.device)

        def locate(idx: torch.Tensor) -> torch.Tensor:
            return flat_loc.index_select(0, tok.index_select(0, idx))

        def payload(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            t = tok.index_select(0, idx)
            rows, pos = t // width, t % width
            # the window's flat indices step by F from the entry's own; a step outside the sequence reads some
            # other in-range entry, masked below (fewer passes over [n, W] than indexing by row and position)
            src = (nz.index_select(0, idx).unsqueeze(1) + offsets * F_).clamp_(0, flat_f.numel() - 1)
            acts = flat_f.index_select(0, src.view(-1)).view(src.shape)
            outside = (offsets < -pos.unsqueeze(1)) | (offsets >= (batch.lengths[rows] - pos).unsqueeze(1))
            return {"value": v.index_select(0, idx), "acts": acts.masked_fill_(outside, 0)}

        self.top.offer(j, -v, locate, payload)
        # The token part of the sampling keys, computed once per token and gathered once per entry for both
        # samples: = sample_keys(seed, layer, j, loc) after the XOR with each feature's (or band's) salt.
        tok_keys = token_keys(self.seed, flat_loc).index_select(0, tok) if self.random.k or self.quantile.k else None
        if self.random.k:
            if self._salts is None:
                self._salts = feature_salts(self.seed, self.layer, F_, f.device)
            self.random.offer(j, tok_keys ^ self._salts.index_select(0, j), locate, payload)
        if self.quantile.k:
            if self._band_salts is None:
                self._band_salts = feature_salts(self.seed ^ _QUANTILE_SALT, self.layer, F_ * N_QUANTILE_BANDS,
                                                 f.device)
            row = _band_table(f.device).index_select(0, bins).add_(j, alpha=N_QUANTILE_BANDS)  # = band_of_bin
            self.quantile.offer(row, tok_keys ^ self._band_salts.index_select(0, row), locate, payload)

    # -- finishing --------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> FeatureStats:
        moved = {name: getattr(self, name).to(device) for name in _TENSORS}
        return FeatureStats(layer=self.layer, n_features=self.n_features, ctx_before=self.ctx_before,
                            ctx_after=self.ctx_after, seed=self.seed, top=self.top.to(device),
                            random=self.random.to(device), quantile=self.quantile.to(device),
                            shards=list(self.shards), **moved)

    def sort_examples(self) -> FeatureStats:
        """Put kept examples in rank order (streaming leaves slots unordered); in place, returns self."""
        self.top.sort_()
        self.random.sort_()
        self.quantile.sort_()
        return self

    def fill_tokens(self, windows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Attach token ids of every kept window: ``windows(loc [n]) -> [n, W]`` (-1 outside the sequence)."""
        for kept in (self.top, self.random, self.quantile):
            tokens = torch.full(kept.loc.shape + (self.window,), -1, dtype=torch.int32, device=kept.loc.device)
            occupied = kept.loc >= 0
            if occupied.any():
                tokens[occupied] = windows(kept.loc[occupied]).to(torch.int32).to(tokens.device)
            kept.data["tokens"] = tokens

    def frequency(self) -> torch.Tensor:
        """Fraction of non-padding tokens where the feature fired, [F] float64."""
        return self.count.double() / max(int(self.n_tokens), 1)

    def mean_act(self) -> torch.Tensor:
        """Mean activation over the tokens where the feature fired (0 if it never fired), [F] float64."""
        return self.act_sum / self.count.clamp(min=1).double()


KEPT = ("top", "random", "quantile")  # the kept-example buffers, by kind
_TENSORS = ("n_tokens", "region_tokens", "think_tokens", "count", "act_sum", "act_max", "hist", "regions",
            "think_hist")


def merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Combine the accumulators of two disjoint parts of a corpus; exact (``act_sum`` up to float64 rounding)."""
    for name in ("layer", "n_features", "ctx_before", "ctx_after", "seed"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"cannot merge stats with different {name}: {getattr(a, name)} vs {getattr(b, name)}")
    for name in KEPT:
        if getattr(a, name).k != getattr(b, name).k:
            raise ValueError(f"cannot merge stats with different {name} sizes: {getattr(a, name).k} vs {getattr(b, name).k}")
        if set(getattr(a, name).data) != set(getattr(b, name).data):
            raise ValueError("cannot merge stats where only one side has token windows; fill_tokens both first")
    overlap = set(a.shards) & set(b.shards)
    if overlap:
        raise ValueError(f"cannot merge stats that both contain shard(s) {sorted(overlap)}")
    b = b.to(a.device)
    out = a.to(a.device)
    out.top, out.random, out.quantile = a.top.clone(), a.random.clone(), a.quantile.clone()
    for name in _TENSORS:
        setattr(out, name, getattr(a, name) + getattr(b, name))
    out.act_max = torch.maximum(a.act_max, b.act_max)
    for name in KEPT:
        src = getattr(b, name)
        occupied = src.loc >= 0
        feat = torch.arange(src.loc.shape[0], device=a.device).unsqueeze(1).expand_as(src.loc)[occupied]
        data = {n: t[occupied] for n, t in src.data.items()}
        locs = src.loc[occupied]
        getattr(out, name).offer(feat, src.key[occupied], lambda idx, locs=locs: locs[idx],
                                 lambda idx, data=data: {n: t[idx] for n, t in data.items()})
    out.shards = sorted(a.shards + b.shards)
    return out.sort_examples()
