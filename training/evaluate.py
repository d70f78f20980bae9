"""Evaluation of an adapter run: how close each model comes to the target, and how it behaves.

Four models, one table: **base** (the base model alone), **hybrid** (adapter model, adapters off),
**adapted** (adapters on) and **target**. On held-out text written by the target (its own greedy
generations, so the text is in-distribution for the model we want to match) we measure
KL(target ‖ model) per next-token position and the residual NMSE per layer; on held-out problems we
generate greedily and count hesitations, response length and answer accuracy. Definitions are those of
the design notes: *KL gap closed* = 1 − KL(target‖adapted) / KL(target‖hybrid); a *hesitation
generation* contains a hesitation token; *reproduced* = target and adapted both hesitate on a prompt;
*false* = adapted hesitates where the target does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from training.adapter import AdapterModel
from training.generation import Generation, generate
from training.hesitation import hesitation_token_ids

log = logging.getLogger(__name__)

MODELS = ("base", "hybrid", "adapted", "target")


@dataclass
class ModelEval:
    kl_to_target: float
    nmse_per_layer: list[float]
    hesitation_rate: float  # fraction of generations with ≥ 1 hesitation token
    hesitations_per_token: dict[str, float]  # per hesitation word: occurrences per generation
    mean_response_len: float
    accuracy: float | None


@dataclass
class EvalResult:
    models: dict[str, ModelEval]
    kl_gap_closed: float
    reproduced_hesitation: float | None  # of the target's hesitation generations, share the adapted repeats
    false_hesitation: float | None  # of the target's non-hesitating prompts, share where adapted hesitates
    same_output: float  # share of prompts where adapted greedy output == target's, token for token
    l0_per_layer: list[float]
    l0_mean: float
    dead_features_per_layer: list[int]
    n_prompts: int
    n_tokens: int
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


@torch.no_grad()
def evaluate(
    adapter_model: AdapterModel,
    base_model: torch.nn.Module | None,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str | None] | None = None,
    *,
    extract_answer: Callable[[str], str | None] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    hesitation_words: Sequence[str] | None = None,
    target_model: torch.nn.Module | None = None,
) -> EvalResult:
    """Evaluate base / hybrid / adapted / target on held-out prompts (chat-formatted prompt strings).

    ``target_model`` is only needed with ``backbone="base"``; with the paper's target backbone the
    adapter model runs the target itself (``mode("target")``). ``base_model`` may be None (then the
    base row is skipped).
    """
    m = adapter_model
    device = next(m.hf.parameters()).device
    hes_ids = hesitation_token_ids(tokenizer, **({"words": hesitation_words} if hesitation_words else {}))
    target_hf = target_model if target_model is not None else m.target_hf

    @contextmanager
    def as_model(name: str):
        with ExitStack() as stack:
            if name == "target" and target_hf is None:
                stack.enter_context(m.mode("target"))
            elif name == "hybrid":
                stack.enter_context(m.mode("hybrid"))
            yield (base_model if name == "base" else target_hf if name == "target" and target_hf is not None else m)

    names = [n for n in MODELS if n != "base" or base_model is not None]

    # 1. Greedy generations of every model on the same prompts.
    gens: dict[str, list[Generation]] = {}
    for name in names:
        with as_model(name) as model:
            gens[name] = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                  greedy=True, batch_size=batch_size)
        log.info("generated %d responses with %s", len(prompts), name)

    # 2. Held-out text = the target's own generations (prompt + response ids, never re-tokenized).
    texts = [list(g.prompt_ids) + list(g.generated_ids) for g in gens["target"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kl_sum = {n: 0.0 for n in names}
    nmse_num = {n: None for n in names}
    nmse_den: torch.Tensor | None = None
    n_tok = 0
    fires: list[torch.Tensor] | None = None
    l0_sum: torch.Tensor | None = None
    for start in range(0, len(texts), batch_size):
        ids, mask = _pad(texts[start : start + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        valid = mask.bool()
        per_model = {}
        for name in names:
            with as_model(name) as model:
                hf = model.hf if isinstance(model, AdapterModel) else model
                if name == "adapted":
                    with m.capture() as acts:
                        per_model[name] = _forward_stats(lambda i, a, mm=model: mm(input_ids=i, attention_mask=a).logits,
                                                         hf, ids, mask)
                    f = [torch.cat(acts[layer], dim=0) for layer in range(m.n_layers)]
                    active = [(x > 0) & valid.unsqueeze(-1) for x in f]
                    batch_fires = [a.any(dim=(0, 1)) for a in active]
                    fires = batch_fires if fires is None else [x | y for x, y in zip(fires, batch_fires, strict=True)]
                    batch_l0 = torch.stack([a.sum(-1)[valid].float().sum() for a in active])
                    l0_sum = batch_l0 if l0_sum is None else l0_sum + batch_l0
                else:
                    per_model[name] = _forward_stats(lambda i, a, mm=model: mm(input_ids=i, attention_mask=a).logits,
                                                     hf, ids, mask)
        t_logp, t_res = per_model["target"]
        t_p = t_logp.exp()
        den = torch.stack([(r.pow(2).sum(-1) * valid).sum() for r in t_res])
        nmse_den = den if nmse_den is None else nmse_den + den
        n_tok += int(valid.sum())
        for name in names:
            logp, res = per_model[name]
            kl = (t_p * (t_logp - logp)).sum(-1)
            kl_sum[name] += float((kl * valid).sum())
            num = torch.stack([((r - tr).pow(2).sum(-1) * valid).sum() for r, tr in zip(res, t_res, strict=True)])
            nmse_num[name] = num if nmse_num[name] is None else nmse_num[name] + num

    # 3. Behaviour.
    def behaviour(gs: list[Generation]) -> tuple[float, dict[str, float], float, float | None, list[bool]]:
        hes = [any(t in hes_ids for t in g.generated_ids) for g in gs]
        per_word: dict[str, float] = {}
        for g in gs:
            for t in g.generated_ids:
                if t in hes_ids:
                    w = tokenizer.decode([t]).strip()
                    per_word[w] = per_word.get(w, 0.0) + 1.0 / len(gs)
        length = sum(len(g.generated_ids) for g in gs) / max(len(gs), 1)
        acc = None
        if answers is not None and extract_answer is not None:
            scored = [(extract_answer(g.text), a) for g, a in zip(gs, answers, strict=True) if a is not None]
            acc = sum(p == a for p, a in scored) / len(scored) if scored else None
        return sum(hes) / max(len(hes), 1), per_word, length, acc, hes

    models: dict[str, ModelEval] = {}
    hes_flags: dict[str, list[bool]] = {}
    for name in names:
        rate, per_word, length, acc, flags = behaviour(gens[name])
        hes_flags[name] = flags
        models[name] = ModelEval(
            kl_to_target=kl_sum[name] / max(n_tok, 1),
            nmse_per_layer=(nmse_num[name] / nmse_den.clamp_min(1e-12)).tolist(),
            hesitation_rate=rate, hesitations_per_token=per_word, mean_response_len=length, accuracy=acc)

    t_h, a_h = hes_flags["target"], hes_flags["adapted"]
    n_t = sum(t_h)
    n_not = len(t_h) - n_t
    reproduced = sum(t and a for t, a in zip(t_h, a_h, strict=True)) / n_t if n_t else None
    false = sum((not t) and a for t, a in zip(t_h, a_h, strict=True)) / n_not if n_not else None
    same = sum(list(g.generated_ids) == list(h.generated_ids)
               for g, h in zip(gens["adapted"], gens["target"], strict=True)) / max(len(prompts), 1)
    hybrid_kl = models["hybrid"].kl_to_target
    gap = 1.0 - models["adapted"].kl_to_target / hybrid_kl if hybrid_kl > 0 else float("nan")
    l0 = (l0_sum / max(n_tok, 1)).tolist() if l0_sum is not None else []
    dead = [int((~x).sum()) for x in fires] if fires is not None else []
    return EvalResult(models=models, kl_gap_closed=gap, reproduced_hesitation=reproduced, false_hesitation=false,
                      same_output=same, l0_per_layer=l0, l0_mean=sum(l0) / max(len(l0), 1),
                      dead_features_per_layer=dead, n_prompts=len(prompts), n_tokens=n_tok)


def format_table(result: EvalResult) -> str:
    """A plain-text table of the evaluation, for the terminal and logs."""
    rows = [f"{'model':<8} {'KL→target':>10} {'NMSE(last)':>10} {'hesitate':>9} {'length':>7} {'accuracy':>9}"]
    for name, e in result.models.items():
        acc = f"{e.accuracy:.1%}" if e.accuracy is not None else "–"
        rows.append(f"{name:<8} {e.kl_to_target:>10.4f} {e.nmse_per_layer[-1]:>10.4f} "
                    f"{e.hesitation_rate:>9.1%} {e.mean_response_len:>7.1f} {acc:>9}")
    rep = f"{result.reproduced_hesitation:.1%}" if result.reproduced_hesitation is not None else "–"
    fal = f"{result.false_hesitation:.1%}" if result.false_hesitation is not None else "–"
    rows.append(f"KL gap closed {result.kl_gap_closed:.1%} · hesitations reproduced {rep} · false {fal} · "
                f"same output {result.same_output:.1%}")
    rows.append(f"L0 {result.l0_mean:.1f} per token per layer ({', '.join(f'{x:.1f}' for x in result.l0_per_layer)})"
                f" · dead features {sum(result.dead_features_per_layer)}")
    return "\n".join(rows)
