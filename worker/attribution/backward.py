"""The hand-written batched backward of the linearised adapter model.

Because the linearised model (see :mod:`worker.attribution.linearize`) is one fixed linear map, a
target's gradient can be pushed down the layers by hand, for many targets at once, without autograd:

- the gradient block is ``G`` [targets, positions, d_model] w.r.t. the residual stream;
- a feature target joins at its own layer (its encoder row × MLP-norm gain × frozen 1/rms, placed at the
  MLP input of its layer), a logit target at the top: targets are ordered by layer, highest first, so
  the live targets at any layer are a prefix of the block and no work is spent above a target's layer;
- at each layer, the edges to that layer's features are ``activation × (G · decoder column)`` at the
  feature's position: one batched matmul over positions with padded per-position decoder blocks;
- attention backward is three matmuls with the frozen patterns (o, patterns per head, v); relp's MLP
  backward uses the half-rule coefficients (down, then gate/up), or, at positions that many targets
  pass, the precomputed d×d Jacobian of that position's linearised MLP (:class:`MLPJacobians`);
  frozen-mlp passes only the residual, and the edges to that layer's error nodes (one per position) are
  the gradient at the MLP output dotted with each position's error vector;
- a chunk of targets only runs over positions up to its last target's position (causal truncation);
- every constant the linearised model adds (b_dec, b_enc, attention biases, what an excluded BOS
  position writes) is dotted with the gradient on the way down, so rows are complete: edges + constant
  = value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.attribution.linearize import Linearization


@dataclass
class DecoderBlocks:
    """Per layer, what a gradient at the layer's MLP output is dotted with, grouped by position, padded.

    ``blocks[l]`` [T, k_l + extra, d]: row j < k_l at position t is ``a · W_dec[:, idx]`` of the j-th
    feature active there (zero padding); in frozen-mlp the next row is that position's error vector;
    the last row is the constant the layer writes there (``b_dec``, plus what an excluded BOS writes at
    position 0). One batched product with the gradient gives edges, error edges and constants at once.
    ``cols[l]`` [T, k_l]: each feature row's index in the active list (padding points at the dummy
    column ``n_active``). Rows come first and the gradient last in the product (``[k, d] @ [d, n]`` per
    position), which runs several times faster on CPU than ``[n, d] @ [d, k]`` for the small k here.
    """

    blocks: list[torch.Tensor]
    cols: list[torch.Tensor]
    n_active: int

    def width(self, layer: int) -> int:
        return int(self.cols[layer].shape[1])


def decoder_blocks(lin: Linearization) -> DecoderBlocks:
    T, d, n = lin.n_pos, lin.d_model, int(lin.feat_act.numel())
    dev, dt = lin.embeds.device, lin.embeds.dtype
    errors = lin.error_vectors is not None
    blocks, cols = [], []
    all_idx = torch.arange(n, device=dev)
    for layer in range(lin.n_layers):
        sel = all_idx[lin.feat_layer == layer]
        pos = lin.feat_pos[sel]
        order = torch.argsort(pos, stable=True)
        sel, pos = sel[order], pos[order]
        counts = torch.bincount(pos, minlength=T)
        k = max(int(counts.max()) if pos.numel() else 0, 1)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(pos.numel(), device=dev) - starts[pos]
        block = torch.zeros(T, k + int(errors) + 1, d, dtype=dt, device=dev)
        col = torch.full((T, k), n, dtype=torch.long, device=dev)
        W = lin.weights[layer].W_dec[:, lin.feat_index[sel]] * lin.feat_act[sel]  # [d, n_l]
        block[pos, rank] = W.T
        col[pos, rank] = sel
        if errors:
            block[:, k] = lin.error_vectors[layer]
        b_dec = lin.weights[layer].b_dec
        if b_dec is not None:
            block[:, -1] = b_dec
        block[0, -1] += lin.bos_out[layer]
        blocks.append(block)
        cols.append(col)
    return DecoderBlocks(blocks, cols, n)


@dataclass
class ChunkResult:
    """Rows for one chunk of targets, in the chunk's order."""

    feature_edges: torch.Tensor  # [n, n_active]
    token_edges: torch.Tensor  # [n, T]
    constants: torch.Tensor  # [n]
    error_edges: torch.Tensor | None = None  # frozen-mlp: [n, L * T], layer-major (error[l, t] at l * T + t)


class MLPJacobians:
    """relp: per layer, the linearised MLP's d×d Jacobian at positions ``< cut[layer]`` (norm included).

    The half-rule MLP at position t maps a gradient g to ``(g W_down ⊙ c_t) [W_gate; W_up] ⊙ s_t``; as one
    matrix ``M_t`` [d, d] a pass costs d² instead of 3·d·I multiply-adds, and building it costs d·I·d, so it
    pays where more than ``break_even`` targets pass (≈ 119 at d 256, I 1024, with the rates measured on CPU).
    Passes per position only fall with position (targets reach back, never forward), so each layer's
    Jacobians cover a prefix.
    """

    def __init__(self, lin: Linearization, budget_bytes: int):
        self.lin = lin
        self.cut = [0] * lin.n_layers
        self.mats: list[torch.Tensor | None] = [None] * lin.n_layers
        d, i = lin.d_model, lin.weights[0].W_down.shape[1]
        # measured on CPU: the per-position d×d products run at ~60% of the large factorised products' rate
        # and assembling a build's [I, d] factor adds ~20% to its matmul
        self.break_even = 1.2 * d * i / max(3 * i - d / 0.6, 1)
        self.bytes_per = d * d * lin.embeds.element_size()
        self.budget = budget_bytes

    def plan(self, passes: torch.Tensor) -> None:
        """Extend the prefixes given the coming passes per (layer, position) [L, T]."""
        if self.lin.mode != "relp":
            return
        want = passes >= self.break_even
        for layer in range(self.lin.n_layers):
            c = int(want[layer].int().cumprod(0).sum())
            self.cut[layer] = max(self.cut[layer], c)
        total = sum(self.cut)
        if total * self.bytes_per > self.budget:  # keep the most travelled positions of every layer
            scale = self.budget / (total * self.bytes_per)
            self.cut = [min(int(c * scale), c) for c in self.cut]
        for layer, c in enumerate(self.cut):
            have = 0 if self.mats[layer] is None else self.mats[layer].shape[0]
            if c > have:
                new = self._build(layer, have, c)
                self.mats[layer] = new if self.mats[layer] is None else torch.cat([self.mats[layer], new])

    def _build(self, layer: int, start: int, stop: int, block: int = 4) -> torch.Tensor:
        lin, w = self.lin, self.lin.weights[layer]
        (d, i), dt, dev = w.W_down.shape, w.W_down.dtype, w.W_down.device
        out = torch.empty(stop - start, d, d, dtype=dt, device=dev)
        K = torch.empty(block, i, d, dtype=dt, device=dev)  # one small buffer, reused: it stays in cache
        for a in range(start, stop, block):
            b = min(a + block, stop)
            k = K[:b - a]
            torch.mul(lin.c_gate[layer, a:b, :, None], w.W_gate, out=k).addcmul_(lin.c_up[layer, a:b, :, None], w.W_up)
            torch.matmul(w.W_down, k, out=out[a - start:b - start])  # [p, d, d]
        return out.mul_((w.ln2 * lin.r2[layer, start:stop, None])[:, None, :])


def _mlp_backward(lin: Linearization, layer: int, g: torch.Tensor, jac: MLPJacobians | None) -> None:
    """relp MLP (half rule, σ frozen) backward from the MLP output to the pre-norm residual, added into ``g``."""
    w, t = lin.weights[layer], g.shape[1]
    c = min(jac.cut[layer], t) if jac is not None else 0
    if c:
        # position-major and contiguous, each position's rows are one matrix: ~10% faster than strided
        g[:, :c] += torch.bmm(g[:, :c].transpose(0, 1).contiguous(), jac.mats[layer][:c]).transpose(0, 1)
    if c < t:
        gp = g[:, c:] @ w.W_down  # [n, t - c, I]
        gx = (gp * lin.c_gate[layer, c:t]) @ w.W_gate
        gx.view(-1, gx.shape[-1]).addmm_(gp.mul_(lin.c_up[layer, c:t]).view(-1, gp.shape[-1]), w.W_up)
        g[:, c:].addcmul_(gx, w.ln2 * lin.r2[layer, c:t, None])


def _source_patterns(lin: Linearization, layer: int, t: int) -> torch.Tensor:
    """The layer's frozen patterns arranged for the backward: [KV, t, rep·t], one matrix per kv head.

    Entry (s, r·t + u) is ``A[kv·rep + r, u, s] · r1[s]``: the value's norm scale at its source position s
    is folded in, and the heads that share a kv head sit side by side, so that one bmm both mixes positions
    and sums those heads.
    """
    KV, rep = lin.n_kv_heads, lin.n_heads // lin.n_kv_heads
    A = lin.patterns[layer, :, :t, :t] * lin.r1[layer, :t]
    return A.view(KV, rep, t, t).permute(0, 3, 1, 2).reshape(KV, t, rep * t)


def _attn_backward(lin: Linearization, layer: int, g: torch.Tensor, new_seeds: torch.Tensor,
                   new_pos: torch.Tensor) -> None:
    """Attention with frozen patterns, backward from its output to the pre-norm residual, added into ``g``.

    ``g`` [n, t, d]; its last ``k = len(new_pos)`` rows were seeded at this layer and hold nothing but
    their seed (``new_seeds`` [k, d] at ``new_pos``): for them the output projection and the pattern need
    that one position, not t (about a sixth of a target's attention work on average).
    """
    w = lin.weights[layer]
    n, t, d = g.shape
    k = int(new_pos.numel())
    m = n - k
    KV, hd = lin.n_kv_heads, lin.head_dim
    rep = lin.n_heads // KV
    P = _source_patterns(lin, layer, t)
    W_v = w.W_v * w.ln1  # [KV*hd, d]: the norm gain folded in
    if m:
        go = (g[:m] @ w.W_o).view(m, t, KV, rep, hd).permute(2, 3, 1, 0, 4).reshape(KV, rep * t, m * hd)
        gv = torch.bmm(P, go).view(KV, t, m, hd).permute(2, 1, 0, 3).reshape(m * t, KV * hd)
        g[:m].view(m * t, d).addmm_(gv, W_v)
    if k:
        go = (new_seeds @ w.W_o).view(k, KV, rep, hd)
        Pk = P.view(KV, t, rep, t)[..., new_pos]  # [KV, t, rep, k]: each new row's pattern row
        gv = torch.einsum("vsrk,kvrh->ksvh", Pk, go).reshape(k * t, KV * hd)
        g[m:].view(k * t, d).addmm_(gv, W_v)


def chunk_passes(n_layers: int, n_pos: int, layers: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """How many of a chunk's targets cross each layer's MLP at each position [L, T] (for :class:`MLPJacobians`)."""
    t = int(positions.max()) + 1
    live = torch.stack([(layers > layer).sum() for layer in range(n_layers)])  # MLP l serves targets above l
    out = torch.zeros(n_layers, n_pos, dtype=torch.long)
    out[:, :t] = live.cpu()[:, None]
    return out


def run_chunk(lin: Linearization, dec: DecoderBlocks, layers: torch.Tensor, positions: torch.Tensor,
              seeds: torch.Tensor, constants: torch.Tensor, jac: MLPJacobians | None = None) -> ChunkResult:
    """Backward for one chunk of targets, sorted by layer (highest first; logits have layer L).

    ``seeds`` [n, d]: each target's gradient at its reading point (MLP input of its layer for features,
    the final residual for logits), norm scale included. ``constants`` [n]: the target's own bias.
    """
    L, d = lin.n_layers, lin.d_model
    n = int(layers.numel())
    if n and bool((layers[1:] > layers[:-1]).any()):
        raise ValueError("targets of a chunk must be sorted by layer, highest first")
    t = int(positions.max()) + 1
    dt, dev = lin.embeds.dtype, lin.embeds.device
    G = torch.zeros(n, t, d, dtype=dt, device=dev)
    edges = torch.zeros(n, dec.n_active + 1, dtype=dt, device=dev)
    const = constants.to(dt).clone()
    errors = torch.zeros(n, L, lin.n_pos, dtype=dt, device=dev) if lin.error_vectors is not None else None
    ar = torch.arange(n, device=dev)
    counts = torch.bincount(layers, minlength=L + 1).tolist()
    live = counts[L]
    G[ar[:live], positions[:live]] = seeds[:live]
    for layer in range(L - 1, -1, -1):
        if live:
            g = G[:live]
            kf = dec.width(layer)
            e = torch.bmm(dec.blocks[layer][:t], g.permute(1, 2, 0))  # [t, rows, live]
            edges[:live, dec.cols[layer][:t].reshape(-1)] = e[:, :kf].permute(2, 0, 1).reshape(live, -1)
            if errors is not None:
                errors[:live, layer, :t] = e[:, kf].T
            const[:live] += e[:, -1].sum(0)
            if lin.mode == "relp":
                _mlp_backward(lin, layer, g, jac)
        k = counts[layer]
        if k:
            G[ar[live:live + k], positions[live:live + k]] = seeds[live:live + k]
        if live + k:
            g = G[:live + k]
            const[:live + k] += g.sum(1) @ lin.attn_const[layer]
            _attn_backward(lin, layer, g, seeds[live:live + k], positions[live:live + k])
            live += k
    tokens = torch.zeros(n, lin.n_pos, dtype=dt, device=dev)
    tokens[:, :t] = torch.bmm(lin.embeds[:t, None, :], G.permute(1, 2, 0))[:, 0].T
    return ChunkResult(edges[:, :-1], tokens, const, errors.flatten(1) if errors is not None else None)
