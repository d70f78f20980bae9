"""The adapter model: a frozen decoder whose MLPs each gain a parallel sparse ReLU branch.

Paper (Hu et al. 2026, arXiv 2602.20904): the *adapter model* takes the target's embeddings,
attention, norms and head, the **base** model's MLP weights, and one adapter per layer::

    f       = ReLU(W_enc x + b_enc)            # x = MLP input (post-attention RMSNorm output)
    mlp_out = base_mlp(x) + W_dec f + b_dec

This module owns that forward. With adapters off it is the "hybrid" baseline; in ``target`` mode
(target backbone only) every layer uses the target's own MLP, so one set of shared weights gives the
target model as well, with no second copy of attention or embeddings in memory.

Interventions (zero / scale / clamp features) and activation capture happen inside
:meth:`AdaptedMLP.forward` and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from training.config import AdapterConfig
from training.interventions import Intervention, apply_interventions

MLPMode = Literal["adapted", "hybrid", "target"]


class TranscoderAdapter(nn.Module):
    """One layer's adapter. Shapes follow ``nn.Linear``: ``W_enc`` [F, d], ``W_dec`` [d, F] (a feature's
    decoder vector is a column), as in the reference checkpoints' ``transcoder_enc``/``transcoder_dec``."""

    def __init__(self, d_model: int, n_features: int, dec_bias: bool = True, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.d_model, self.n_features = d_model, n_features
        self.W_enc = nn.Parameter(torch.empty(n_features, d_model, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n_features, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_model, n_features, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **kw)) if dec_bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The paper's init: encoder U(±1/sqrt(d)), zero biases, zero decoder, so the adapter starts silent.

        ``generator`` makes the init a function of a seed (the trainer passes one, so a run is reproducible
        whatever the process drew from torch's global generator before it)."""
        bound = 1.0 / math.sqrt(self.d_model)
        with torch.no_grad():
            if generator is None:
                self.W_enc.uniform_(-bound, bound)
            else:  # drawn on the CPU from the generator, so every device gets the same numbers
                init = torch.rand(self.W_enc.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
                self.W_enc.copy_(init.to(self.W_enc.device, self.W_enc.dtype))
            self.b_enc.zero_()
            self.W_dec.zero_()
            if self.b_dec is not None:
                self.b_dec.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] → f [..., F] (non-negative)."""
        return F.relu(F.linear(x, self.W_enc, self.b_enc))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., F] → [..., d]."""
        return F.linear(f, self.W_dec, self.b_dec)

    def decoder_norms(self) -> torch.Tensor:
        """||W_dec[:, i]||_2 for every feature, [F]."""
        return self.W_dec.norm(dim=0)


@dataclass
class AdapterState:
    """Per-forward switches shared by every layer's :class:`AdaptedMLP` of one model.

    Mutable on purpose: context managers on :class:`AdapterModel` set and restore these fields, so that
    Hugging Face ``forward``/``generate`` run unchanged.
    """

    mode: MLPMode = "adapted"
    interventions: tuple[Intervention, ...] = ()
    prompt_lengths: torch.Tensor | None = None  # [batch] real prompt length per row
    position_ids: torch.Tensor | None = None  # [batch, seq] set by a pre-hook on each forward
    captures: dict[int, list[torch.Tensor]] | None = None  # layer → captured f per forward call
    capture_layers: frozenset[int] | None = None
    capture_detach: bool = True
    extra: dict = field(default_factory=dict)


class AdaptedMLP(nn.Module):
    """Replaces ``layer.mlp``: base MLP + adapter, or the target's own MLP in ``target`` mode."""

    def __init__(self, layer: int, base_mlp: nn.Module, adapter: TranscoderAdapter, state: AdapterState,
                 target_mlp: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        self.base_mlp = base_mlp
        self.adapter = adapter
        self.target_mlp = target_mlp
        self._state = [state]  # a list so nn.Module does not register the state as a submodule

    @property
    def state(self) -> AdapterState:
        return self._state[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Adapter activations for MLP input x, interventions applied: [batch, seq, F]."""
        s = self.state
        f = self.adapter.encode(x)
        if s.interventions:
            f = apply_interventions(f, self.layer, s.interventions, s.position_ids, s.prompt_lengths)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.state
        if s.mode == "target":
            if self.target_mlp is None:
                raise RuntimeError("target mode needs the target MLPs (target backbone, kept at build time)")
            return self.target_mlp(x)
        out = self.base_mlp(x)
        if s.mode == "hybrid":
            return out
        f = self.features(x)
        if s.captures is not None and (s.capture_layers is None or self.layer in s.capture_layers):
            s.captures.setdefault(self.layer, []).append(f.detach() if s.capture_detach else f)
        return out + self.adapter.decode(f)


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Qwen2/Llama/Mistral-style causal LM (``model.model.layers``)."""
    inner = getattr(hf_model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(hf_model).__name__} has no .model.layers; expected a Qwen2/Llama-style decoder")
    for i, layer in enumerate(layers):
        if not hasattr(layer, "mlp") or not hasattr(layer, "post_attention_layernorm"):
            raise TypeError(f"layer {i} lacks .mlp or .post_attention_layernorm; unsupported architecture")
    return layers


class AdapterModel(nn.Module):
    """A Hugging Face causal LM whose MLPs are :class:`AdaptedMLP`. ``forward``/``generate`` are the HF ones.

    ``self.hf``: the assembled causal LM (backbone from the target, or the base with ``backbone="base"``).
    ``self.target_hf``: a separate target model, only with ``backbone="base"`` (else None: target mode
    reuses the shared weights). Only adapter parameters require grad.
    """

    def __init__(self, hf_model: nn.Module, adapters: Sequence[TranscoderAdapter], cfg: AdapterConfig,
                 state: AdapterState, target_hf: nn.Module | None = None):
        super().__init__()
        self.hf = hf_model
        self.adapters = nn.ModuleList(adapters)
        self.cfg = cfg
        self.state = state
        self.target_hf = target_hf
        self.hf.model.register_forward_pre_hook(self._record_positions, with_kwargs=True)

    # -- structure -------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    @property
    def mlps(self) -> list[AdaptedMLP]:
        return [layer.mlp for layer in self.layers]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def config(self):  # the HF config, so code written for HF models keeps working
        return self.hf.config

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return self.adapters.parameters()

    def reset_adapters(self, seed: int) -> None:
        """Re-initialise every adapter from ``seed`` (layer by layer from one generator): a fresh run's start."""
        generator = torch.Generator().manual_seed(seed)
        for adapter in self.adapters:
            adapter.reset_parameters(generator)

    # -- forward ---------------------------------------------------------------------------------
    def _record_positions(self, module, args, kwargs):
        """Keep the logical positions of the current forward so interventions can select positions."""
        pos = kwargs.get("position_ids")
        if pos is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = kwargs.get("inputs_embeds")
            seq = ids.shape[1] if ids is not None else emb.shape[1]
            batch = ids.shape[0] if ids is not None else emb.shape[0]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            device = (ids if ids is not None else emb).device
            pos = (torch.arange(seq, device=device) + past).expand(batch, -1)
            mask = kwargs.get("attention_mask")
            if mask is not None and not isinstance(mask, dict) and mask.dim() == 2 and mask.shape[1] == past + seq:
                # left padding: logical position 0 is the first real token (the mask covers cache + new tokens)
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        self.state.position_ids = pos
        return None

    def _active_hf(self) -> nn.Module:
        """The model a forward runs: ``target_hf`` in target mode with ``backbone="base"``, else ``hf``."""
        return self.target_hf if self.state.mode == "target" and self.target_hf is not None else self.hf

    def forward(self, *args, **kwargs):
        return self._active_hf()(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        return self._active_hf().generate(*args, **kwargs)

    # -- switches --------------------------------------------------------------------------------
    @contextmanager
    def mode(self, mode: MLPMode) -> Iterator[AdapterModel]:
        """``adapted`` (default), ``hybrid`` (adapters off) or ``target`` (target MLPs; target backbone)."""
        old = self.state.mode
        self.state.mode = mode
        try:
            yield self
        finally:
            self.state.mode = old

    @contextmanager
    def intervene(self, interventions: Sequence[Intervention] | Intervention,
                  prompt_lengths: torch.Tensor | Sequence[int] | int | None = None) -> Iterator[AdapterModel]:
        """Apply interventions to every forward inside the block (including ``generate``)."""
        if isinstance(interventions, Intervention):
            interventions = [interventions]
        n_layers, n_features = self.n_layers, self.n_features  # once: generation enters this every step
        for iv in interventions:
            for layer in iv.layers or ():
                if not 0 <= layer < n_layers:
                    raise IndexError(f"intervention layer {layer} outside the model's {n_layers} layers")
            bad = iv.outside(n_layers, n_features)
            if bad is not None:
                raise IndexError(f"feature {bad} outside {n_layers} layers × {n_features}")
        if isinstance(prompt_lengths, int):
            prompt_lengths = [prompt_lengths]
        if prompt_lengths is not None and not isinstance(prompt_lengths, torch.Tensor):
            prompt_lengths = torch.tensor(list(prompt_lengths))
        old = (self.state.interventions, self.state.prompt_lengths)
        self.state.interventions = tuple(old[0]) + tuple(interventions)
        self.state.prompt_lengths = prompt_lengths if prompt_lengths is not None else old[1]
        try:
            yield self
        finally:
            self.state.interventions, self.state.prompt_lengths = old

    @contextmanager
    def capture(self, layers: Sequence[int] | None = None, detach: bool = True) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Collect adapter activations f (after interventions) per layer: ``{layer: [f per forward call]}``."""
        old = (self.state.captures, self.state.capture_layers, self.state.capture_detach)
        store: dict[int, list[torch.Tensor]] = {}
        self.state.captures = store
        self.state.capture_layers = frozenset(layers) if layers is not None else None
        self.state.capture_detach = detach
        try:
            yield store
        finally:
            self.state.captures, self.state.capture_layers, self.state.capture_detach = old


def build_adapter_model(base: nn.Module, target: nn.Module, cfg: AdapterConfig, *, dtype: torch.dtype | None = None,
                        keep_target_mlps: bool = True) -> AdapterModel:
    """Assemble the adapter model *in place*: the backbone model's MLPs are replaced, no copy is made.

    ``backbone="target"`` (the paper): ``target`` becomes the adapter model; its MLPs are kept as
    ``target_mlp`` (for target mode) when ``keep_target_mlps``; ``base`` donates its MLP modules.
    ``backbone="base"``: ``base`` becomes the adapter model and ``target`` is kept whole beside it.
    Everything but the adapters is frozen.
    """
    if base.config.num_hidden_layers != target.config.num_hidden_layers or \
            base.config.hidden_size != target.config.hidden_size:
        raise ValueError("base and target differ in depth or width; they must share an architecture")
    host, other = (target, base) if cfg.backbone == "target" else (base, target)
    host_layers, base_layers = decoder_layers(host), decoder_layers(base)
    for p in list(host.parameters()) + list(other.parameters()):
        p.requires_grad_(False)
    state = AdapterState()
    d = host.config.hidden_size
    ref = next(host.parameters())
    adapters = []
    for i, layer in enumerate(host_layers):
        adapter = TranscoderAdapter(d, cfg.n_features, cfg.dec_bias, dtype=dtype or ref.dtype, device=ref.device)
        target_mlp = layer.mlp if (cfg.backbone == "target" and keep_target_mlps) else None
        layer.mlp = AdaptedMLP(i, base_layers[i].mlp, adapter, state, target_mlp)
        adapters.append(adapter)
    return AdapterModel(host, adapters, cfg, state, target_hf=target if cfg.backbone == "base" else None)
