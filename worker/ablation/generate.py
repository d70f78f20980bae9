"""Token-by-token generation of the adapter model under interventions, several conditions in lockstep.

Why not ``model.generate``: an ablation page wants, for every generated token, its log-probability and
the KL between the unablated and the ablated next-token distributions *given the ablated text so far*
(design.md's definition), as the tokens come, and a job must be able to stop between two tokens. So
this is one loop over one KV cache, with one batched forward per step carrying every condition as a
batch row (a *track*):

- a *sampling* track generates its own text (``ablated``: interventions on; ``unablated``: none);
- a *scoring* track (``follows=...``) is fed another track's tokens and never samples; the
  ``reference`` track is the unablated model reading the ablated text, and its distribution gives
  the ablated track's per-step KL(p_reference ‖ p_ablated).

Every row receives one token per step, so the rows share one length: no padding, no attention mask.
Each track's interventions carry ``rows=(r,)``, so they touch their own row only. Sampling uses common
random numbers: one uniform per step, drawn from ``seed`` and shared by all sampling tracks, turned into
a token by inverse CDF. With the same seed and settings a track therefore produces the same tokens alone
as beside others, and an intervention that changes nothing changes no token.

:func:`lockstep_prompts` does the same for several prompts at once (left-padded, with logical positions),
one row per (prompt, track): the experiments' batch path.

Interventions are the one implementation in ``training/interventions.py``, entered through
``AdapterModel.intervene`` around each forward (never held open across a ``yield``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from transformers import DynamicCache

from training.adapter import AdapterModel, MLPMode
from training.interventions import Intervention

log = logging.getLogger(__name__)

StopReason = Literal["eos", "max_new_tokens", "context"]

ABLATED, UNABLATED, REFERENCE = "ablated", "unablated", "reference"


@dataclass(frozen=True)
class SamplingSettings:
    """How every sampling track generates. ``temperature == 0`` is greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # the stop token is generated and reported, then its track ends
    context_length: int | None = None  # prompt + generated tokens never exceed it
    watch_ids: tuple[int, ...] = ()  # tokens whose probability every step reports (e.g. a graph's target)
    # ids never generated nor given probability: the padded vocabulary (rows past the tokenizer); every
    # distribution (sampling, log-probs, KL) is over the other ids
    suppress_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number ≥ 0 (0 = greedy), not {self.temperature}")
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))
        object.__setattr__(self, "watch_ids", tuple(int(t) for t in self.watch_ids))
        object.__setattr__(self, "suppress_ids", tuple(int(t) for t in self.suppress_ids))


@dataclass(frozen=True)
class Track:
    """One batch row: a name, its interventions, and (for a scoring track) the track whose text it reads."""

    name: str
    interventions: tuple[Intervention, ...] = ()
    follows: str | None = None


@dataclass(frozen=True)
class Step:
    """One generated token of one sampling track."""

    track: str
    index: int  # 0-based among the generated tokens
    token_id: int
    logprob: float  # log p(token | prompt + earlier tokens) under this track, temperature 1
    kl: float | None  # KL(p_follower ‖ p_track) in nats before this token, where a scoring track follows
    stop: StopReason | None = None  # set on the track's last step
    prompt: int = 0  # which prompt, in a multi-prompt batch (:func:`lockstep_prompts`)
    watched: tuple[float, ...] = ()  # p(token) of each ``SamplingSettings.watch_ids`` before this token


@dataclass
class Generated:
    """A finished track: every step's token, log-probability and KL, and why it stopped."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kls: list[float | None] = field(default_factory=list)
    stop: StopReason | None = None
    watched: list[tuple[float, ...]] = field(default_factory=list)  # per step, when watch_ids were given

    def add(self, step: Step) -> None:
        if step.watched:
            self.watched.append(step.watched)
        self.token_ids.append(step.token_id)
        self.logprobs.append(step.logprob)
        self.kls.append(step.kl)
        self.stop = step.stop or self.stop


def ablation_tracks(interventions: Sequence[Intervention], *, unablated: bool = True,
                    reference: bool = True) -> list[Track]:
    """The standard rows of an ablation: ablated, its unablated reference (for KL), and the unablated run."""
    tracks = [Track(ABLATED, tuple(interventions))]
    if reference:
        tracks.append(Track(REFERENCE, (), follows=ABLATED))
    if unablated:
        tracks.append(Track(UNABLATED, ()))
    return tracks


def _check_tracks(tracks: Sequence[Track]) -> None:
    names = [t.name for t in tracks]
    if not tracks:
        raise ValueError("lockstep needs at least one track")
    if len(set(names)) != len(names):
        raise ValueError(f"track names must be unique, got {names}")
    samplers = {t.name for t in tracks if t.follows is None}
    for t in tracks:
        if t.follows is not None and t.follows not in samplers:
            raise ValueError(f"track {t.name!r} follows {t.follows!r}, which is not a sampling track of {names}")
    if len({t.follows for t in tracks if t.follows}) != sum(1 for t in tracks if t.follows):
        raise ValueError("at most one scoring track may follow each sampling track")


def _language_model(model: AdapterModel, mode: MLPMode) -> torch.nn.Module:
    """The HF module that runs ``mode``: the adapter model, or the separate target with ``backbone="base"``."""
    if mode == "target" and model.target_hf is not None:
        return model.target_hf
    return model.hf


@dataclass(frozen=True)
class _Row:
    prompt: int  # index into the prompts of the batch
    track: Track

    @property
    def text_of(self) -> tuple[int, str]:
        """The (prompt, sampling track) whose tokens this row is fed."""
        return self.prompt, self.track.follows or self.track.name


def _row_interventions(rows: Sequence[_Row]) -> tuple[Intervention, ...]:
    """Each track's interventions restricted to its own batch rows (one intervention per distinct one)."""
    if len(rows) == 1:
        return rows[0].track.interventions
    where: dict[Intervention, list[int]] = {}
    for r, row in enumerate(rows):
        for iv in row.track.interventions:
            where.setdefault(iv, []).append(r)
    return tuple(replace(iv, rows=tuple(rs)) for iv, rs in where.items())


def _pick(logp: torch.Tensor, temperature: float, u: float) -> torch.Tensor:
    """Next token per row from log-probs [rows, V]: argmax, or inverse CDF of softmax(logp / T) at ``u``."""
    if temperature == 0:
        return logp.argmax(-1)
    cdf = torch.softmax(logp.double() / temperature, dim=-1).cumsum(-1)
    return torch.searchsorted(cdf, cdf[:, -1:] * u).squeeze(-1).clamp(max=logp.shape[-1] - 1)


def _budget(prompt: Sequence[int], settings: SamplingSettings) -> tuple[int, StopReason]:
    """How many tokens a prompt may generate, and the stop reason when it uses them all."""
    if not prompt:
        raise ValueError("the prompt is empty; generation needs at least one token")
    if settings.context_length is not None:
        room = settings.context_length - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens and leaves no room in the model's context "
                             f"of {settings.context_length}")
        if room < settings.max_new_tokens:
            return room, "context"
    return settings.max_new_tokens, "max_new_tokens"


def lockstep(model: AdapterModel, prompt_ids: Sequence[int], tracks: Sequence[Track],
             settings: SamplingSettings, *, mode: MLPMode = "adapted") -> Iterator[list[Step]]:
    """Generate every sampling track of ``tracks`` together; yield each step's :class:`Step` per live track.

    Interventions with ``positions="prompt"``/``"generated"`` split at ``len(prompt_ids)``. A track ends
    at a stop id, at ``max_new_tokens`` or when the context is full; its row (and its follower's) then
    leaves the batch. Stop iterating (or ``close()``) to cancel: nothing stays switched on in the model.
    """
    return lockstep_prompts(model, [prompt_ids], tracks, settings, mode=mode)


def lockstep_prompts(model: AdapterModel, prompts: Sequence[Sequence[int]], tracks: Sequence[Track],
                     settings: SamplingSettings, *, mode: MLPMode = "adapted") -> Iterator[list[Step]]:
    """:func:`lockstep` over several prompts at once: one row per (prompt, track), prompts left-padded.

    Steps carry their prompt's index. Positions are logical (0 = a row's first real token), so
    interventions by position and the model see each prompt as if alone; each prompt keeps its own
    budget against the context. Sampling shares one uniform per step across all rows, as alone.
    """
    _check_tracks(tracks)
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise ValueError("no prompts to generate from")
    budgets = [_budget(p, settings) for p in prompts]
    lm = _language_model(model, mode)
    device = next(lm.parameters()).device
    stop_ids = set(settings.stop_ids)
    rng = torch.Generator().manual_seed(settings.seed)
    cache = DynamicCache(config=lm.config)
    suppress = torch.tensor(settings.suppress_ids, dtype=torch.long, device=device) if settings.suppress_ids else None

    active = [_Row(p, t) for p in range(len(prompts)) for t in tracks]
    width = max(len(p) for p in prompts)
    step_input = torch.tensor([[0] * (width - len(prompts[r.prompt])) + prompts[r.prompt] for r in active],
                              device=device)
    # only a padded batch needs a mask (a lone prompt keeps the exact unpadded computation)
    mask = None if all(len(p) == width for p in prompts) else \
        torch.tensor([[0] * (width - len(prompts[r.prompt])) + [1] * len(prompts[r.prompt]) for r in active],
                     device=device)
    row_ivs = _row_interventions(active)
    for index in range(max(n for n, _ in budgets)):
        u = torch.rand((), generator=rng, dtype=torch.float64).item()  # drawn every step: seeds stay aligned
        lengths = [len(prompts[r.prompt]) for r in active]
        kwargs = {}
        if mask is not None:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1]:]
            kwargs = {"attention_mask": mask, "position_ids": positions}
        with torch.inference_mode():
            with model.mode(mode), model.intervene(row_ivs, prompt_lengths=lengths):
                logits = lm(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1, **kwargs).logits
            last = logits[:, -1].float()
            if suppress is not None:
                last = last.index_fill(-1, suppress, float("-inf"))
            logp = torch.log_softmax(last, dim=-1)  # [rows, V]
            picked = _pick(logp, settings.temperature, u)
            samplers = [r for r, row in enumerate(active) if row.track.follows is None]
            followers = {row.text_of: r for r, row in enumerate(active) if row.track.follows is not None}
            chosen = picked[samplers]
            chosen_logp = logp[samplers].gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            pairs = [(r, followers[active[r].text_of]) for r in samplers if active[r].text_of in followers]
            if pairs:
                s_rows, f_rows = zip(*pairs, strict=True)
                ref = logp[list(f_rows)]
                terms = ref.exp() * (ref - logp[list(s_rows)])  # suppressed ids: 0 · (-inf + inf) = nan → 0
                kl_vals = terms.nan_to_num(nan=0.0).sum(-1).clamp(min=0).tolist()
            watched = logp[samplers][:, list(settings.watch_ids)].exp().tolist() if settings.watch_ids else None
            tokens, lps = chosen.tolist(), chosen_logp.tolist()  # one device sync per step
        kl_of = dict(zip((s for s, _ in pairs), kl_vals, strict=True)) if pairs else {}
        steps, token_of = [], {}
        for j, r in enumerate(samplers):
            row, tok = active[r], tokens[j]
            token_of[row.text_of] = tok
            budget, reason = budgets[row.prompt]
            stop = "eos" if tok in stop_ids else (reason if index == budget - 1 else None)
            steps.append(Step(row.track.name, index, tok, lps[j], kl_of.get(r), stop, row.prompt,
                              tuple(watched[j]) if watched is not None else ()))
        yield steps

        ended = {(s.prompt, s.track) for s in steps if s.stop is not None}
        keep = [r for r, row in enumerate(active) if row.text_of not in ended]
        if not keep:
            return
        if len(keep) < len(active):
            cache.batch_select_indices(torch.tensor(keep, device=device))
            active = [active[r] for r in keep]
            mask = None if mask is None else mask[keep]
            row_ivs = _row_interventions(active)
        step_input = torch.tensor([[token_of[row.text_of]] for row in active], device=device)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)


def collect(steps: Iterable[list[Step]]) -> dict[str, Generated]:
    """Run a :func:`lockstep` iterator to the end: ``{track: Generated}`` for every sampling track."""
    return collect_prompts(steps, 1)[0]


def collect_prompts(steps: Iterable[list[Step]], n_prompts: int) -> list[dict[str, Generated]]:
    """Run a :func:`lockstep_prompts` iterator to the end: ``{track: Generated}`` per prompt."""
    out: list[dict[str, Generated]] = [{} for _ in range(n_prompts)]
    for batch in steps:
        for s in batch:
            out[s.prompt].setdefault(s.track, Generated()).add(s)
    return out


def generate(model: AdapterModel, prompt_ids: Sequence[int], settings: SamplingSettings, *,
             interventions: Sequence[Intervention] = (), mode: MLPMode = "adapted",
             with_kl: bool = False) -> Generated:
    """One condition alone (optionally with its unablated reference for KL); a convenience over :func:`lockstep`."""
    tracks = ablation_tracks(interventions, unablated=False, reference=with_kl)
    return collect(lockstep(model, prompt_ids, tracks, settings, mode=mode))[ABLATED]
