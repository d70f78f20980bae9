"""One forward of the adapter model that caches everything the linearisation freezes.

The attribution graph is computed on a *linearised* adapter model (paper's hesitation study, RelP-style):

- RMSNorm scales 1/rms(h) are frozen (the gains stay as weights), so every norm is a fixed diagonal map;
- attention patterns are frozen, so attention is linear in its values (q/k and their biases only shape
  the frozen patterns);
- ``relp``: SiLU is ``g · stopgrad(σ(g))`` and the gate⊙up product takes the *half rule* (half the
  gradient through each factor). With σ frozen the MLP is homogeneous of degree 2 in its input, so by
  Euler's theorem the half-rule Jacobian applied to the input returns the MLP output exactly: the
  linearised MLP is the fixed linear map ``x ↦ W_down (c_gate ⊙ W_gate x + c_up ⊙ W_up x)`` with
  ``c_gate = ½·u·σ(g)``, ``c_up = ½·g·σ(g)`` taken from this forward;
- ``frozen-mlp`` (circuit-tracer's semantics): the base MLP output at each (layer, position) is a frozen
  vector, a *source* like circuit-tracer's error node (``error_vectors``): the MLP output that no adapter
  feature explains. At an excluded BOS position it is a constant instead (circuit-tracer zeroes the
  error vectors and features there);
- adapter features are stop-gradient leaves: each contributes ``f_i · W_dec[:, i]``.

The result is one fixed linear map from the sources (token embeddings, feature activations and, in
frozen-mlp, the error vectors) plus explicit constants (``b_dec``, ``b_enc``, attention value/output
biases, everything at an excluded BOS position) to every target. :func:`linearize` runs our own float forward (any dtype, float64 in tests)
and checks it against nothing; the tests compare it with the Hugging Face forward.
:func:`linear_forward` evaluates the frozen linear model for arbitrary source values: the reference that
the tests use to verify edges by intervention and completeness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from training.adapter import AdapterModel

logger = logging.getLogger(__name__)

LinearMode = Literal["relp", "frozen-mlp"]
MODES: tuple[str, ...] = ("relp", "frozen-mlp")


@dataclass
class LayerWeights:
    """One decoder block's weights in the compute dtype (references when the dtype already matches).

    Shapes follow ``nn.Linear`` (``[out, in]``). ``ln1``/``ln2`` are the RMSNorm gains.
    """

    ln1: torch.Tensor  # [d]
    ln2: torch.Tensor  # [d]
    W_q: torch.Tensor  # [H*hd, d]
    b_q: torch.Tensor | None
    W_k: torch.Tensor  # [KV*hd, d]
    b_k: torch.Tensor | None
    W_v: torch.Tensor  # [KV*hd, d]
    b_v: torch.Tensor | None
    W_o: torch.Tensor  # [d, H*hd]
    b_o: torch.Tensor | None
    W_gate: torch.Tensor  # [I, d]
    W_up: torch.Tensor  # [I, d]
    W_down: torch.Tensor  # [d, I]
    W_enc: torch.Tensor  # [F, d]
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [d, F]
    b_dec: torch.Tensor | None  # [d]


@dataclass
class Linearization:
    """Frozen quantities of one prompt's forward, in ``dtype``. T = prompt length, L = layers.

    Features at an excluded BOS position are not sources: their decoder output is folded into the
    per-layer constant ``bos_out`` and they never appear in ``feat_*``. In frozen-mlp mode the base MLP
    output there joins that constant too, and ``error_vectors[:, 0]`` is zero (no error node carries it).
    """

    mode: str
    input_ids: torch.Tensor  # [T]
    embeds: torch.Tensor  # [T, d] h_0
    weights: list[LayerWeights]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    r1: torch.Tensor  # [L, T] 1/rms of the attention-norm input
    r2: torch.Tensor  # [L, T] 1/rms of the MLP-norm input
    patterns: torch.Tensor  # [L, H, T, T] attention patterns A[t, s]
    attn_const: torch.Tensor  # [L, d] output of attention from the v/o biases (rows of A sum to 1)
    mlp_in: torch.Tensor  # [L, T, d] x, the adapter's and base MLP's input
    base_out: torch.Tensor  # [L, T, d] base MLP output
    error_vectors: torch.Tensor | None  # frozen-mlp: [L, T, d] the error nodes' vectors (base_out, 0 at a BOS)
    c_gate: torch.Tensor | None  # [L, T, I] relp half-rule coefficients (None in frozen-mlp)
    c_up: torch.Tensor | None  # [L, T, I]
    pre_acts: list[torch.Tensor]  # per layer [T, F] encoder pre-activations W_enc x + b_enc
    feat_layer: torch.Tensor  # [n_active] long
    feat_pos: torch.Tensor  # [n_active] long
    feat_index: torch.Tensor  # [n_active] long
    feat_act: torch.Tensor  # [n_active] activation values (source strengths)
    bos_out: torch.Tensor  # [L, d] constant MLP output at an excluded BOS (its features; frozen-mlp: + base)
    bos_excluded: bool
    final_ln: torch.Tensor  # [d]
    r_final: torch.Tensor  # [T]
    W_U: torch.Tensor  # [V, d]
    b_U: torch.Tensor | None
    logits: torch.Tensor  # [V] logits at the last position (real model, this dtype)

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.embeds.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.weights[0].W_enc.shape[0])

    def demeaned_unembed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logit directions ``W_U[tok] - mean_v W_U[v]`` [n, d]: a logit node's value is the demeaned logit."""
        return self.W_U[token_ids] - self.W_U.mean(0, keepdim=True)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach()
    return t if t.dtype == dtype else t.to(dtype)


def _layer_weights(model: AdapterModel, i: int, dtype: torch.dtype) -> LayerWeights:
    layer = model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    base, ad = mlp.base_mlp, mlp.adapter
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(base, name):
            raise TypeError(f"layer {i}: base MLP {type(base).__name__} lacks {name}; need a gated (SwiGLU) MLP")
    c = lambda t: _cast(t, dtype)  # noqa: E731
    return LayerWeights(
        ln1=c(layer.input_layernorm.weight), ln2=c(layer.post_attention_layernorm.weight),
        W_q=c(attn.q_proj.weight), b_q=c(attn.q_proj.bias), W_k=c(attn.k_proj.weight), b_k=c(attn.k_proj.bias),
        W_v=c(attn.v_proj.weight), b_v=c(attn.v_proj.bias), W_o=c(attn.o_proj.weight), b_o=c(attn.o_proj.bias),
        W_gate=c(base.gate_proj.weight), W_up=c(base.up_proj.weight), W_down=c(base.down_proj.weight),
        W_enc=c(ad.W_enc), b_enc=c(ad.b_enc), W_dec=c(ad.W_dec), b_dec=c(ad.b_dec),
    )


def _check_architecture(model: AdapterModel) -> None:
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"attribution supports SiLU-gated MLPs only, not hidden_act={cfg.hidden_act!r}")
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        raise ValueError("attribution does not support sliding-window attention layers")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x [H, T, hd] (rotate-half convention, as Qwen2/Llama)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _rms_inv(h: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(h.pow(2).mean(-1) + eps)


@torch.no_grad()
def linearize(model: AdapterModel, input_ids: torch.Tensor, mode: LinearMode = "relp", *,
              dtype: torch.dtype | None = None, exclude_bos: bool = True,
              bos_token_id: int | None = None) -> Linearization:
    """Run the adapter model on ``input_ids`` [T] in ``dtype`` (default: the model's) and cache the frozen parts.

    Adapters are always on and the model's interventions are ignored: the graph explains the clean
    adapted forward. ``exclude_bos``: features at position 0 are not sources when token 0 is the BOS id
    (``bos_token_id``, default the model config's).
    """
    if mode not in MODES:
        raise ValueError(f"unknown linearisation mode {mode!r}; use one of {MODES}")
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D tensor of token ids, got shape {tuple(input_ids.shape)}")
    _check_architecture(model)
    cfg = model.config
    dtype = dtype or next(model.hf.parameters()).dtype
    dev = model.hf.lm_head.weight.device
    ids = input_ids.to(dev)
    vocab = model.hf.get_input_embeddings().weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(ids.min())}, max {int(ids.max())}")
    T, L = ids.shape[0], model.n_layers
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    eps = float(cfg.rms_norm_eps)
    if bos_token_id is None:
        bos_token_id = getattr(cfg, "bos_token_id", None)
    bos_excluded = bool(exclude_bos and bos_token_id is not None and int(ids[0]) == int(bos_token_id))

    rot = model.hf.model.rotary_emb
    inv_freq = rot.inv_freq.to(dtype)
    freqs = torch.arange(T, device=dev, dtype=dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * float(rot.attention_scaling)  # [T, hd]
    sin = emb.sin() * float(rot.attention_scaling)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()

    weights = [_layer_weights(model, i, dtype) for i in range(L)]
    h = model.hf.get_input_embeddings().weight[ids].to(dtype)
    embeds = h.clone()
    r1s, r2s, pats, consts, xs, bases, cgs, cus, pres, bos_outs = ([] for _ in range(10))
    f_layer, f_pos, f_idx, f_act = [], [], [], []
    for i, w in enumerate(weights):
        r1 = _rms_inv(h, eps)
        n1 = h * r1[:, None] * w.ln1
        q = F.linear(n1, w.W_q, w.b_q).view(T, n_heads, head_dim).transpose(0, 1)
        k = F.linear(n1, w.W_k, w.b_k).view(T, n_kv, head_dim).transpose(0, 1)
        v = F.linear(n1, w.W_v, w.b_v).view(T, n_kv, head_dim).transpose(0, 1)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        rep = n_heads // n_kv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = (q @ k.transpose(1, 2)) * head_dim**-0.5
        A = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [H, T, T]
        o = (A @ v).transpose(0, 1).reshape(T, n_heads * head_dim)
        h = h + F.linear(o, w.W_o, w.b_o)
        # the attention output's constant part: v bias through patterns whose rows sum to 1, plus o bias
        zero = torch.zeros(n_heads * head_dim, dtype=dtype, device=dev)
        vb = w.b_v.view(n_kv, head_dim).repeat_interleave(rep, 0).reshape(-1) if w.b_v is not None else zero
        consts.append(F.linear(vb, w.W_o, w.b_o))
        r2 = _rms_inv(h, eps)
        x = h * r2[:, None] * w.ln2
        g, u = F.linear(x, w.W_gate), F.linear(x, w.W_up)
        sig = torch.sigmoid(g)
        base = F.linear(g * sig * u, w.W_down)
        pre = F.linear(x, w.W_enc, w.b_enc)
        f = pre.clamp(min=0)
        h = h + base + F.linear(f, w.W_dec, w.b_dec)
        if bos_excluded:
            bos_outs.append(w.W_dec @ f[0])
            f = f.clone()
            f[0] = 0
        else:
            bos_outs.append(torch.zeros_like(h[0]))
        pos, idx = f.nonzero(as_tuple=True)
        f_layer.append(torch.full_like(pos, i))
        f_pos.append(pos)
        f_idx.append(idx)
        f_act.append(f[pos, idx])
        r1s.append(r1)
        r2s.append(r2)
        pats.append(A)
        xs.append(x)
        bases.append(base)
        pres.append(pre)
        if mode == "relp":
            cgs.append(0.5 * u * sig)
            cus.append(0.5 * g * sig)
    base_out = torch.stack(bases)
    bos_out = torch.stack(bos_outs)
    errors = None
    if mode == "frozen-mlp":
        errors = base_out.clone()
        if bos_excluded:
            bos_out = bos_out + base_out[:, 0]
            errors[:, 0] = 0
    final_ln = _cast(model.hf.model.norm.weight, dtype)
    r_f = _rms_inv(h, eps)
    W_U = _cast(model.hf.lm_head.weight, dtype)
    b_U = _cast(getattr(model.hf.lm_head, "bias", None), dtype)
    logits = F.linear(h[-1] * r_f[-1] * final_ln, W_U, b_U)
    lin = Linearization(
        mode=mode, input_ids=ids, embeds=embeds, weights=weights, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, eps=eps, r1=torch.stack(r1s), r2=torch.stack(r2s), patterns=torch.stack(pats),
        attn_const=torch.stack(consts), mlp_in=torch.stack(xs), base_out=base_out, error_vectors=errors,
        c_gate=torch.stack(cgs) if mode == "relp" else None, c_up=torch.stack(cus) if mode == "relp" else None,
        pre_acts=pres, feat_layer=torch.cat(f_layer), feat_pos=torch.cat(f_pos), feat_index=torch.cat(f_idx),
        feat_act=torch.cat(f_act), bos_out=bos_out, bos_excluded=bos_excluded, final_ln=final_ln,
        r_final=r_f, W_U=W_U, b_U=b_U, logits=logits,
    )
    logger.debug("linearised %d tokens, %d layers: %d active features (BOS excluded: %s)",
                 T, L, lin.feat_act.numel(), bos_excluded)
    return lin


@dataclass
class LinearOutputs:
    """What :func:`linear_forward` returns: every target's value in the linearised model."""

    pre_acts: list[torch.Tensor]  # per layer [T, F] encoder pre-activations (feature target values)
    logits_demeaned: torch.Tensor  # [V] demeaned logits at the last position (logit target values)


def linear_forward(lin: Linearization, *, embeds: torch.Tensor | None = None,
                   feature_acts: list[torch.Tensor] | None = None, errors: torch.Tensor | None = None,
                   include_constants: bool = True) -> LinearOutputs:
    """Evaluate the frozen linear model for given sources, with every frozen quantity from ``lin``.

    ``embeds`` [T, d] replaces the token embeddings; ``feature_acts`` (per layer [T, F]) replaces the
    feature activations (the BOS-position features of an excluded BOS stay in the constants);
    ``errors`` [L, T, d] replaces frozen-mlp's error vectors (the sources that stand for the base MLP).
    ``include_constants=False`` drops every bias and BOS term: the pure linear part.
    This is deliberately a plain forward, independent of the engine's hand-written backward.
    """
    T = lin.n_pos
    H, KV, hd = lin.n_heads, lin.n_kv_heads, lin.head_dim
    rep = H // KV
    k = 1.0 if include_constants else 0.0
    h = lin.embeds.clone() if embeds is None else embeds.to(lin.embeds.dtype)
    if feature_acts is None:
        feature_acts = default_feature_acts(lin)
    pres = []
    for i, w in enumerate(lin.weights):
        n1 = h * lin.r1[i, :, None] * w.ln1
        v = F.linear(n1, w.W_v).view(T, KV, hd).transpose(0, 1).repeat_interleave(rep, 0)
        o = (lin.patterns[i] @ v).transpose(0, 1).reshape(T, H * hd)
        h = h + F.linear(o, w.W_o) + k * lin.attn_const[i]
        x = h * lin.r2[i, :, None] * w.ln2
        pres.append(F.linear(x, w.W_enc) + k * w.b_enc)
        if lin.mode == "relp":
            mlp = F.linear(lin.c_gate[i] * F.linear(x, w.W_gate) + lin.c_up[i] * F.linear(x, w.W_up), w.W_down)
        else:
            mlp = (lin.error_vectors if errors is None else errors.to(h.dtype))[i]
        dec = F.linear(feature_acts[i], w.W_dec)
        if w.b_dec is not None:
            dec = dec + k * w.b_dec
        bos = torch.zeros_like(h)
        bos[0] = lin.bos_out[i]
        h = h + mlp + dec + k * bos
    final = h[-1] * lin.r_final[-1] * lin.final_ln
    logits = F.linear(final, lin.W_U, lin.b_U if include_constants else None)
    return LinearOutputs(pre_acts=pres, logits_demeaned=logits - logits.mean())


def default_feature_acts(lin: Linearization) -> list[torch.Tensor]:
    """The forward's feature activations as dense per-layer [T, F] tensors (excluded BOS features zero)."""
    T, Fn = lin.n_pos, lin.n_features
    out = torch.zeros(lin.n_layers, T, Fn, dtype=lin.embeds.dtype, device=lin.embeds.device)
    out[lin.feat_layer, lin.feat_pos, lin.feat_index] = lin.feat_act
    return list(out.unbind(0))
