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
    """Per layer, the active features' scaled decoder columns grouped by position, padded.

    ``blocks[l]`` [T, d, k_l]: column j at position t is ``a · W_dec[:, idx]`` of the j-th feature active
    there (zero padding); ``cols[l]`` [T, k_l]: that feature's index in the active list (padding points at
    the dummy column ``n_active``).
    """

    blocks: list[torch.Tensor]
    cols: list[torch.Tensor]
    n_active: int


def decoder_blocks(lin: Linearization) -> DecoderBlocks:
    T, d, n = lin.n_pos, lin.d_model, int(lin.feat_act.numel())
    dev, dt = lin.embeds.device, lin.embeds.dtype
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
        block = torch.zeros(T, d, k, dtype=dt, device=dev)
        col = torch.full((T, k), n, dtype=torch.long, device=dev)
        W = lin.weights[layer].W_dec[:, lin.feat_index[sel]] * lin.feat_act[sel]  # [d, n_l]
        block[pos, :, rank] = W.T
        col[pos, rank] = sel
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
    pays where more than ``break_even`` targets pass (≈ 93 at d 256, I 1024). Passes per position only fall
    with position (targets reach back, never forward), so each layer's Jacobians cover a prefix.
    """

    def __init__(self, lin: Linearization, budget_bytes: int):
        self.lin = lin
        self.cut = [0] * lin.n_layers
        self.mats: list[torch.Tensor | None] = [None] * lin.n_layers
        d, i = lin.d_model, lin.weights[0].W_down.shape[1]
        self.break_even = d * i / max(3 * i - d, 1)
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

    def _build(self, layer: int, start: int, stop: int, block: int = 16) -> torch.Tensor:
        lin, w = self.lin, self.lin.weights[layer]
        out = []
        for a in range(start, stop, block):
            b = min(a + block, stop)
            K = lin.c_gate[layer, a:b, :, None] * w.W_gate + lin.c_up[layer, a:b, :, None] * w.W_up  # [p, I, d]
            M = torch.matmul(w.W_down, K)  # [p, d, d]
            out.append(M * (w.ln2 * lin.r2[layer, a:b, None])[:, None, :])
        return torch.cat(out)


def _mlp_backward(lin: Linearization, layer: int, g: torch.Tensor, jac: MLPJacobians | None) -> torch.Tensor:
    """relp MLP (half rule, σ frozen) backward from the MLP output to the pre-norm residual: [n, t, d]."""
    w, t = lin.weights[layer], g.shape[1]
    c = min(jac.cut[layer], t) if jac is not None else 0
    out = torch.empty_like(g)
    if c:
        out[:, :c] = torch.bmm(g[:, :c].transpose(0, 1), jac.mats[layer][:c]).transpose(0, 1)
    if c < t:
        gp = g[:, c:] @ w.W_down  # [n, t - c, I]
        gx = (gp * lin.c_gate[layer, c:t]) @ w.W_gate
        gx += (gp * lin.c_up[layer, c:t]) @ w.W_up
        out[:, c:] = gx * (w.ln2 * lin.r2[layer, c:t, None])
    return out


def _attn_backward(lin: Linearization, layer: int, g: torch.Tensor) -> torch.Tensor:
    """Attention with frozen patterns, backward from its output to the pre-norm residual: [n, t, d]."""
    w = lin.weights[layer]
    n, t, _ = g.shape
    H, KV, hd = lin.n_heads, lin.n_kv_heads, lin.head_dim
    go = (g @ w.W_o).view(n, t, H, hd).permute(2, 1, 0, 3).reshape(H, t, n * hd)
    A = lin.patterns[layer, :, :t, :t]
    gv = torch.bmm(A.transpose(1, 2), go)  # gv[h, s] = Σ_t A[h, t, s] go[h, t]
    gv = gv.view(KV, H // KV, t, n, hd).sum(1).permute(2, 1, 0, 3).reshape(n, t, KV * hd)
    return (gv @ w.W_v) * (w.ln1 * lin.r1[layer, :t, None])


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
        w = lin.weights[layer]
        if live:
            g = G[:live]
            e = torch.bmm(g.transpose(0, 1), dec.blocks[layer][:t])  # [t, live, k]
            edges[:live, dec.cols[layer][:t].reshape(-1)] = e.transpose(0, 1).reshape(live, -1)
            gsum = g.sum(1)
            if w.b_dec is not None:
                const[:live] += gsum @ w.b_dec
            const[:live] += g[:, 0] @ lin.bos_out[layer]
            if lin.mode == "relp":
                g += _mlp_backward(lin, layer, g, jac)
            else:
                errors[:live, layer, :t] = torch.einsum("ntd,td->nt", g, lin.error_vectors[layer, :t])
        k = counts[layer]
        if k:
            G[ar[live:live + k], positions[live:live + k]] = seeds[live:live + k]
            live += k
        if live:
            g = G[:live]
            const[:live] += g.sum(1) @ lin.attn_const[layer]
            g += _attn_backward(lin, layer, g)
    tokens = torch.zeros(n, lin.n_pos, dtype=dt, device=dev)
    tokens[:, :t] = torch.einsum("ntd,td->nt", G, lin.embeds[:t])
    return ChunkResult(edges[:, :-1], tokens, const, errors.flatten(1) if errors is not None else None)
