"""Evaluation of an adapter run: how close each model comes to the target, and how it behaves.

Four models, one table: **base** (the base model alone), **hybrid** (adapter model, adapters off),
**adapted** (adapters on) and **target**. Two kinds of data, and every figure says which it comes from:

- **Held-out texts** (the paper's table): token sequences the adapters never trained on (a split of the
  training texts by default, or a file of their own; for the organism its held-out reasoning traces). On
  them: KL(target ‖ model) per next-token position (mean over all real positions), the residual NMSE per
  layer (summed squared error over summed squared target activation, after the embeddings and after
  each block), and the adapters' L0 and dead features. *KL gap closed* = 1 − KL(target‖adapted) /
  KL(target‖hybrid) on these texts.
- **Generations** on held-out prompts: every model generates greedily; hesitations are counted with
  ``training.hesitation`` (words in the decoded text, a multi-token word once), response length in
  tokens, and answers scored where the prompts carry them. The KL on the target's *own* generations is
  reported beside the held-out one (``kl_on_generations``): a model can match the target on its greedy
  path yet not on text in general, or the other way round.

*Reproduced* = target and adapted both hesitate on a prompt; *false* = adapted hesitates where the
target does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from training.adapter import AdapterModel
from training.generation import Generation, generate
from training.hesitation import HesitationCounter

log = logging.getLogger(__name__)

MODELS = ("base", "hybrid", "adapted", "target")

ScoreAnswer = Callable[[str, str], bool | None]  # (generated text, expected answer) → correct? (None: unscored)


@dataclass
class ModelEval:
    kl_to_target: float | None  # held-out texts: mean KL(target ‖ model) per position
    nmse_per_layer: list[float]  # held-out texts: L+1 points
    hesitation_rate: float | None  # generations: share with ≥ 1 hesitation (None: no prompts)
    hesitations_per_word: dict[str, float]  # generations: occurrences of each word per generation
    mean_response_len: float | None  # generations: generated tokens per prompt (eos included)
    accuracy: float | None  # generations: share right among prompts with an answer (None: none scored)
    kl_on_generations: float | None = None  # the target's own greedy generations: mean KL per position


@dataclass
class EvalResult:
    models: dict[str, ModelEval]
    kl_gap_closed: float | None  # held-out texts
    reproduced_hesitation: float | None  # of the target's hesitation generations, share the adapted repeats
    false_hesitation: float | None  # of the target's non-hesitating prompts, share where adapted hesitates
    same_output: float | None  # share of prompts where adapted greedy output == target's, token for token
    l0_per_layer: list[float]  # held-out texts
    l0_mean: float
    dead_features_per_layer: list[int]  # never active on the held-out texts
    n_prompts: int
    n_tokens: int  # held-out text tokens
    n_texts: int = 0
    kl_gap_closed_generations: float | None = None
    n_scored: int = 0  # prompts with an answer
    hesitation_words: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # where the texts and prompts came from (shown with the table)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _residual_hooks(hf_model: torch.nn.Module, store: list[torch.Tensor]):
    """Capture the residual stream after the embeddings and after each decoder block."""
    inner = hf_model.model
    handles = [inner.embed_tokens.register_forward_hook(lambda m, i, o: store.append(o))]
    for layer in inner.layers:
        handles.append(layer.register_forward_hook(
            lambda m, i, o: store.append(o[0] if isinstance(o, tuple) else o)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences; returns ids [B, T] and mask [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def _forward_stats(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hf_model: torch.nn.Module,
                   ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Log-probs [B, T, V] (float32) and residuals (L+1 × [B, T, d]) of one model on one batch."""
    resid: list[torch.Tensor] = []
    with _residual_hooks(hf_model, resid):
        logits = run(ids, mask)
    return F.log_softmax(logits.float(), dim=-1), [r.float() for r in resid]


@dataclass
class TextStats:
    """KL and NMSE of each model against the target on a set of texts, and the adapters' L0 there."""

    kl: dict[str, float]
    nmse_per_layer: dict[str, list[float]]
    n_tokens: int
    l0_per_layer: list[float]
    dead_features_per_layer: list[int]


class _Models:
    """base / hybrid / adapted / target as callables over one adapter model (and an optional base model)."""

    def __init__(self, m: AdapterModel, base_model: torch.nn.Module | None, target_model: torch.nn.Module | None):
        self.m, self.base = m, base_model
        self.target_hf = target_model if target_model is not None else m.target_hf
        self.names = [n for n in MODELS if n != "base" or base_model is not None]

    @contextmanager
    def use(self, name: str):
        m = self.m
        with ExitStack() as stack:
            if name == "target" and self.target_hf is None:
                stack.enter_context(m.mode("target"))
            elif name == "hybrid":
                stack.enter_context(m.mode("hybrid"))
            if name == "base":
                yield self.base
            elif name == "target" and self.target_hf is not None:
                yield self.target_hf
            else:
                yield m


def token_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices of texts in batches of at most ``batch_size`` texts and ``max_batch_tokens`` padded tokens
    (a longer text goes alone), longest first so that each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and \
                (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def text_stats(models: _Models, texts: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64,
               max_batch_tokens: int = 8192) -> TextStats:
    """KL(target ‖ model) averaged over every real position of ``texts``, residual NMSE per point, and L0.

    Memory: one batch (≤ ``max_batch_tokens`` padded tokens) holds the target's log-probs and one other
    model's at a time (at a 152k vocabulary, 8,192 tokens are 5 GB of float32 log-probs each).
    """
    if not texts:
        raise ValueError("no texts to measure on")
    m, names = models.m, models.names
    device = next(m.hf.parameters()).device
    kl_sum = dict.fromkeys(names, 0.0)
    nmse_num: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    nmse_den: torch.Tensor | None = None
    n_tok = 0
    fires: list[torch.Tensor] | None = None
    l0_sum: torch.Tensor | None = None
    for batch in token_batches([len(t) for t in texts], batch_size, max_batch_tokens):
        ids, mask = _pad([texts[i] for i in batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        valid = mask.bool()
        with models.use("target") as target:
            hf = target.hf if isinstance(target, AdapterModel) else target
            t_logp, t_res = _forward_stats(lambda i, a, mm=target: mm(input_ids=i, attention_mask=a).logits, hf,
                                           ids, mask)
        t_p = t_logp.exp()
        den = torch.stack([(r.pow(2).sum(-1) * valid).sum() for r in t_res])
        nmse_den = den if nmse_den is None else nmse_den + den
        n_tok += int(valid.sum())
        for name in names:
            with models.use(name) as model:
                hf = model.hf if isinstance(model, AdapterModel) else model
                run = lambda i, a, mm=model: mm(input_ids=i, attention_mask=a).logits  # noqa: E731
                if name == "target":
                    logp, res = t_logp, t_res
                elif name != "adapted":
                    logp, res = _forward_stats(run, hf, ids, mask)
                else:
                    with m.capture() as acts:
                        logp, res = _forward_stats(run, hf, ids, mask)
                    active = [(torch.cat(acts[layer], dim=0) > 0) & valid.unsqueeze(-1) for layer in range(m.n_layers)]
                    del acts
                    batch_fires = [a.any(dim=(0, 1)) for a in active]
                    fires = batch_fires if fires is None else [x | y for x, y in zip(fires, batch_fires, strict=True)]
                    batch_l0 = torch.stack([a.sum(-1)[valid].float().sum() for a in active])
                    l0_sum = batch_l0 if l0_sum is None else l0_sum + batch_l0
            kl = (t_p * (t_logp - logp)).sum(-1)
            kl_sum[name] += float((kl * valid).sum())
            num = torch.stack([((r - tr).pow(2).sum(-1) * valid).sum() for r, tr in zip(res, t_res, strict=True)])
            nmse_num[name] = num if nmse_num[name] is None else nmse_num[name] + num
            del logp, res, kl
    assert nmse_den is not None
    return TextStats(
        kl={n: kl_sum[n] / max(n_tok, 1) for n in names},
        nmse_per_layer={n: (nmse_num[n] / nmse_den.clamp_min(1e-12)).tolist() for n in names},
        n_tokens=n_tok,
        l0_per_layer=(l0_sum / max(n_tok, 1)).tolist() if l0_sum is not None else [],
        dead_features_per_layer=[int((~x).sum()) for x in fires] if fires is not None else [])


def _gap(stats: TextStats) -> float:
    hybrid = stats.kl["hybrid"]
    return 1.0 - stats.kl["adapted"] / hybrid if hybrid > 0 else float("nan")


@torch.no_grad()
def evaluate(
    adapter_model: AdapterModel,
    base_model: torch.nn.Module | None,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str | None] | None = None,
    *,
    heldout: Sequence[Sequence[int]] | None = None,
    score_answer: ScoreAnswer | None = None,
    extract_answer: Callable[[str], str | None] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    hesitation_words: Sequence[str] | None = None,
    target_model: torch.nn.Module | None = None,
    data: dict[str, Any] | None = None,
    max_batch_tokens: int = 8192,
) -> EvalResult:
    """Evaluate base / hybrid / adapted / target (module docstring).

    ``prompts``: chat-formatted prompt strings (may be empty: then only the held-out rows are filled).
    ``heldout``: token-id sequences (never re-tokenized); without it the target's generations stand in (and
    ``data`` should say so). ``score_answer(text, answer)`` scores a generation; ``extract_answer`` (an
    older form) compares ``extract_answer(text) == answer``. ``target_model`` is only needed with
    ``backbone="base"``; ``base_model`` may be None (the base row is then skipped).
    """
    if extract_answer is not None and score_answer is None:
        score_answer = lambda text, want: extract_answer(text) == want  # noqa: E731
    models = _Models(adapter_model, base_model, target_model)
    names = models.names
    counter = HesitationCounter.for_tokenizer(tokenizer, hesitation_words)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # 1. Greedy generations of every model on the same prompts.
    gens: dict[str, list[Generation]] = {}
    for name in names if prompts else []:
        with models.use(name) as model:
            gens[name] = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                  greedy=True, batch_size=batch_size)
        log.info("generated %d responses with %s", len(prompts), name)

    # 2. Held-out texts; 3. the target's own generations (prompt + response ids, never re-tokenized).
    generated = [list(g.prompt_ids) + list(g.generated_ids) for g in gens.get("target", [])]
    if heldout is None:
        if not generated:
            raise ValueError("nothing to evaluate on: give held-out texts or prompts")
        heldout = generated
    held = text_stats(models, list(heldout), pad_id, batch_size, max_batch_tokens)
    on_gen = text_stats(models, generated, pad_id, batch_size, max_batch_tokens) \
        if generated and heldout is not generated else held

    # 4. Behaviour.
    def behaviour(gs: list[Generation]) -> tuple[float, dict[str, float], float, float | None, list[bool]]:
        flags, per_word = [], {}
        for g in gs:
            words = counter.per_word(g.generated_ids)
            flags.append(bool(words))
            for w, k in words.items():
                per_word[w] = per_word.get(w, 0.0) + k / len(gs)
        length = sum(len(g.generated_ids) for g in gs) / max(len(gs), 1)
        acc = None
        if answers is not None and score_answer is not None:
            scored = [score_answer(g.text, a) for g, a in zip(gs, answers, strict=True) if a is not None]
            scored = [s for s in scored if s is not None]
            acc = sum(scored) / len(scored) if scored else None
        return sum(flags) / max(len(flags), 1), per_word, length, acc, flags

    out: dict[str, ModelEval] = {}
    hes_flags: dict[str, list[bool]] = {}
    for name in names:
        rate = per_word = length = acc = None
        if name in gens:
            rate, per_word, length, acc, hes_flags[name] = behaviour(gens[name])
        out[name] = ModelEval(
            kl_to_target=held.kl[name], nmse_per_layer=held.nmse_per_layer[name], hesitation_rate=rate,
            hesitations_per_word=per_word or {}, mean_response_len=length, accuracy=acc,
            kl_on_generations=on_gen.kl[name] if generated else None)

    reproduced = false = same = None
    if gens:
        t_h, a_h = hes_flags["target"], hes_flags["adapted"]
        n_t = sum(t_h)
        n_not = len(t_h) - n_t
        reproduced = sum(t and a for t, a in zip(t_h, a_h, strict=True)) / n_t if n_t else None
        false = sum((not t) and a for t, a in zip(t_h, a_h, strict=True)) / n_not if n_not else None
        same = sum(list(g.generated_ids) == list(h.generated_ids)
                   for g, h in zip(gens["adapted"], gens["target"], strict=True)) / max(len(prompts), 1)
    l0 = held.l0_per_layer
    n_scored = sum(a is not None for a in answers) if answers is not None and score_answer is not None else 0
    return EvalResult(models=out, kl_gap_closed=_gap(held), reproduced_hesitation=reproduced, false_hesitation=false,
                      same_output=same, l0_per_layer=l0, l0_mean=sum(l0) / max(len(l0), 1),
                      dead_features_per_layer=held.dead_features_per_layer, n_prompts=len(prompts),
                      n_tokens=held.n_tokens, n_texts=len(heldout),
                      kl_gap_closed_generations=_gap(on_gen) if generated else None, n_scored=n_scored,
                      hesitation_words=list(counter.words), data=dict(data or {}))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _num(x: float | None, width: int, fmt: str) -> str:
    return f"{'–':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def format_table(result: EvalResult) -> str:
    """A plain-text table of the evaluation, for the terminal and logs; it names the data of each column."""
    texts = result.data.get("texts") or "held-out texts"
    prompts = result.data.get("prompts") or "held-out prompts"
    rows = [f"held-out texts: {texts} ({result.n_texts} texts, {result.n_tokens} tokens)",
            f"generations: {prompts} ({result.n_prompts} prompts, greedy; {result.n_scored} with an answer)",
            f"{'':<8} {'— held-out texts —':^22} {'— generations —':^47}",
            f"{'model':<8} {'KL→target':>10} {'NMSE(last)':>11} {'KL(gen)':>9} {'hesitate':>9} {'length':>7} "
            f"{'accuracy':>9}"]
    for name, e in result.models.items():
        rows.append(f"{name:<8} {_num(e.kl_to_target, 10, '.4f')} {_num(e.nmse_per_layer[-1], 11, '.4f')} "
                    f"{_num(e.kl_on_generations, 9, '.4f')} {_pct(e.hesitation_rate):>9} "
                    f"{_num(e.mean_response_len, 7, '.1f')} {_pct(e.accuracy):>9}")
    gen_gap = "" if result.kl_gap_closed_generations is None else \
        f" (on the target's generations {_pct(result.kl_gap_closed_generations)})"
    rows.append(f"KL gap closed {_pct(result.kl_gap_closed)} on held-out texts{gen_gap}")
    rows.append(f"hesitations ({', '.join(result.hesitation_words)}) reproduced {_pct(result.reproduced_hesitation)} · "
                f"false {_pct(result.false_hesitation)} · same output {_pct(result.same_output)}")
    rows.append(f"L0 {result.l0_mean:.1f} per token per layer ({', '.join(f'{x:.1f}' for x in result.l0_per_layer)})"
                f" · dead features {sum(result.dead_features_per_layer)} (on the held-out texts)")
    return "\n".join(rows)
