"""The hesitation study (paper's hesitation study): which adapter features the hesitation token depends on.

Steps, each a function here (the ``hesitation`` job in :mod:`worker.hesitation.job` strings them together
and stores the results):

1. **Sites**: traces (the target's greedy generations, or reference traces) and the positions where a
   hesitation starts (:func:`find_hesitation_sites`, :func:`collect_sites`: ``training.hesitation``'s
   definition, a word found in the decoded text, its first token the site); a sample of them, stratified
   over (hesitation word, group) (:func:`sample_sites`).
2. **Graphs**: per site, an attribution graph of the adapter model on the tokens before the hesitation,
   with the hesitation token as a logit target (:func:`site_graph`).
3. **Aggregation**: per graph, each feature's influence on *the hesitation logit* (the influence seeded at
   that logit node alone, as a share of the graph's total feature influence), the part carried by its
   direct edge, and the part at formatting-token positions (:func:`graph_evidence`); summed over graphs
   with the number of pruned graphs that keep the feature (:func:`aggregate`).
4. **Roles**: logit-lens ranks of hesitation tokens (:func:`lens_ranks`), then the rules of
   :mod:`worker.hesitation.roles`.
5. **The set**: features ranked by aggregated influence; the set grows geometrically (1, 2, 3, 4, 6, 9, ...), each size
   measured by zero-ablating it at every position of the adapted model on validation prompts, until the
   hesitations removed reach the target or the size reaches the cap (:func:`choose_set`); the chosen set
   is then measured on report prompts disjoint from the validation ones (:func:`measure`).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from training.adapter import AdapterModel, MLPMode
from training.generation import generate
from training.hesitation import HesitationCounter, count_hesitations, hesitation_positions
from training.interventions import Intervention
from worker.attribution import Graph, PrunedGraph, attribute, prune_graph
from worker.attribution.graph import compute_node_influence, normalize_rows
from worker.hesitation.roles import FeatureEvidence, is_formatting_token

log = logging.getLogger(__name__)

FeatureKey = tuple[int, int]  # (layer, index)


# -- 1. sites -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """One token sequence: a prompt and what was generated (or written) after it."""

    token_ids: tuple[int, ...]
    prompt_length: int  # tokens of the prompt; hesitations are searched after it
    group: str = ""  # stratum besides the word (the organism's task family)
    prompt: str = ""  # the chat-formatted prompt text


@dataclass(frozen=True)
class HesitationSite:
    """A hesitation token at ``position`` of trace ``trace``: the graph explains it from the tokens before."""

    trace: int
    position: int
    token_id: int
    word: str
    group: str = ""


Hesitation = HesitationCounter | Iterable[int]  # the definition, or a plain set of hesitation token ids


def _occurrences(token_ids: Sequence[int], hesitation: Hesitation) -> list[tuple[int, str | None]]:
    """(first token, word) of each hesitation in ``token_ids``; with a plain id set, each such token (word None)."""
    if isinstance(hesitation, HesitationCounter):
        return [(first, word) for first, _, word in hesitation.occurrences(list(token_ids))]
    return [(p, None) for p in hesitation_positions(list(token_ids), set(hesitation))]


def find_hesitation_sites(token_ids: Sequence[int], hesitation: Hesitation, start: int = 0) -> list[int]:
    """Positions (indices into ``token_ids``) where hesitations start, at or after ``start`` (the prompt length).

    ``hesitation``: a :class:`HesitationCounter` (a word spelled by several tokens is one site, at its first
    token) or a set of hesitation token ids. Position 0 can hold no site: a graph needs a token before it.
    """
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    return [p for p, _ in _occurrences(token_ids, hesitation) if p >= max(start, 1)]


def collect_sites(traces: Sequence[Trace], hesitation: Hesitation,
                  word_of: Callable[[int], str] | None = None) -> list[HesitationSite]:
    """Every hesitation site of ``traces``. The word (the stratum) is the occurrence's (a counter), else
    ``word_of(token id)``."""
    out = []
    for i, t in enumerate(traces):
        for p, word in _occurrences(t.token_ids, hesitation):
            if p >= max(t.prompt_length, 1):
                name = word if word is not None else (word_of(t.token_ids[p]) if word_of else str(t.token_ids[p]))
                out.append(HesitationSite(i, p, t.token_ids[p], name, t.group))
    return out


def sample_sites(sites: Sequence[HesitationSite], n: int, seed: int = 0) -> list[HesitationSite]:
    """``n`` sites, stratified: round robin over (word, group) strata, each shuffled with ``seed``.

    Within the round robin a trace already used is skipped while unused ones remain, so the sample spreads
    over prompts. Returns all sites (in that order) when there are at most ``n``.
    """
    if n < 1:
        raise ValueError(f"the number of graphs must be at least 1, got {n}")
    rng = random.Random(seed)
    strata: dict[tuple[str, str], list[HesitationSite]] = defaultdict(list)
    for s in sites:
        strata[(s.word, s.group)].append(s)
    queues = []
    for key in sorted(strata):
        items = list(strata[key])
        rng.shuffle(items)
        queues.append(items)
    chosen: list[HesitationSite] = []
    used_traces: set[int] = set()
    while len(chosen) < n and any(queues):
        for q in queues:
            if not q or len(chosen) >= n:
                continue
            pick = next((k for k, s in enumerate(q) if s.trace not in used_traces), 0)
            site = q.pop(pick)
            chosen.append(site)
            used_traces.add(site.trace)
    return chosen


# -- 2. graphs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphSettings:
    """How each graph is built and pruned (the engine's knobs)."""

    mode: str = "relp"
    max_feature_nodes: int = 10_000
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    batch_size: int = 32


def site_graph(model: AdapterModel, token_ids: Sequence[int], target_token: int | None,
               settings: GraphSettings = GraphSettings(), *, progress: bool = False, n_real_tokens: int | None = None,
               extra_logit_tokens: tuple[int, ...] = ()) -> tuple[Graph, PrunedGraph]:
    """The graph of the adapted model on ``token_ids`` (logits at the last one), and its pruned version.

    ``n_real_tokens``: the tokenizer's size (padded vocabulary ids never become logit nodes)."""
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=next(model.parameters()).device)
    with model.mode("adapted"):
        graph = attribute(model, ids, mode=settings.mode, max_feature_nodes=settings.max_feature_nodes,  # type: ignore[arg-type]
                          max_n_logits=settings.max_n_logits, desired_logit_prob=settings.desired_logit_prob,
                          batch_size=settings.batch_size, target_token=target_token, progress=progress,
                          n_real_tokens=n_real_tokens, extra_logit_tokens=extra_logit_tokens)
    return graph, prune_graph(graph, settings.node_threshold, settings.edge_threshold)


# -- 3. aggregation -------------------------------------------------------------------------------------


@dataclass
class GraphEvidence:
    """One graph's view of its features: per (layer, index), [influence, direct, formatting, effect] shares."""

    shares: dict[FeatureKey, list[float]]
    kept: set[FeatureKey]  # features the pruned graph keeps
    target_prob: float


def signed_effect(graph: Graph, row: int, max_iter: int = 1000) -> torch.Tensor:
    """Per node, the linear effect on node ``row`` (a logit) of removing it, through every path [n_nodes].

    Removing source s changes target t's pre-activation by ``-A[t, s]``; a feature's activation follows its
    pre-activation (ReLU, active), and a unit of it moves the logit by ``e_t / a_t``. So
    ``e = w (B + B² + …)`` with ``B = A`` whose feature rows are divided by their activations and ``w`` the
    one-hot of ``row``: the signed counterpart of the influence (positive: the node promotes the token).
    """
    adj = graph.adjacency_matrix.double()
    n_feat = graph.n_feature_nodes
    b = adj.clone()
    b[:n_feat] /= graph.target_values[:n_feat].double().clamp(min=1e-12)[:, None]
    cur = b[row].clone()
    total = cur.clone()
    for _ in range(max_iter):
        cur = cur @ b
        if not bool(cur.any()):
            return total
        total += cur
    raise RuntimeError(f"signed effect did not converge in {max_iter} iterations (is the graph acyclic?)")


def graph_evidence(graph: Graph, pruned: PrunedGraph, target_token: int,
                   formatting: Sequence[bool]) -> GraphEvidence:
    """Influence of each feature node on the ``target_token`` logit alone, as shares of the graph's total.

    ``formatting[pos]``: whether the token at ``pos`` is a formatting token. A feature active at several
    positions sums them. The direct part is the first term of the influence series: the feature's share of
    the logit row's |edges| (``normalize_rows``), which is exactly what its direct edge contributes. The
    effect (:func:`signed_effect`) is a share of the graph's total |effect| of features, with its sign.
    """
    if len(formatting) != graph.n_pos:
        raise ValueError(f"formatting flags for {len(formatting)} positions, graph has {graph.n_pos}")
    adj = graph.adjacency_matrix.double()
    row = graph.logit_node_index(int(target_token))
    n_feat = graph.n_feature_nodes
    w = torch.zeros(graph.n_nodes, dtype=adj.dtype)
    w[row] = 1.0
    infl = compute_node_influence(adj, w)[:n_feat]
    direct = normalize_rows(adj)[row, :n_feat]
    effect = signed_effect(graph, row)[:n_feat]
    total, total_effect = float(infl.sum()), float(effect.abs().sum())
    shares: dict[FeatureKey, list[float]] = {}
    if total > 0:
        effect = effect / total_effect if total_effect > 0 else effect
        for (layer, pos, index), f, d, e in zip(graph.feature_nodes.tolist(), (infl / total).tolist(),
                                                (direct / total).tolist(), effect.tolist(), strict=True):
            acc = shares.setdefault((layer, index), [0.0, 0.0, 0.0, 0.0])
            acc[0] += f
            acc[1] += d
            acc[2] += f if formatting[pos] else 0.0
            acc[3] += e
    k = (graph.logit_tokens == int(target_token)).nonzero()
    prob = float(graph.logit_probabilities[int(k[0])]) if k.numel() else 0.0
    return GraphEvidence(shares, pruned.feature_ids(), prob)


def aggregate(graphs: Sequence[GraphEvidence]) -> list[FeatureEvidence]:
    """Sum each feature's shares over graphs and count the pruned graphs keeping it; most influential first."""
    out: dict[FeatureKey, FeatureEvidence] = {}
    for g in graphs:
        for key, (f, d, fmt, e) in g.shares.items():
            ev = out.get(key) or out.setdefault(key, FeatureEvidence(*key))
            ev.influence += f
            ev.direct += d
            ev.format_influence += fmt
            ev.effect += e
        for key in g.kept:
            (out.get(key) or out.setdefault(key, FeatureEvidence(*key))).n_graphs += 1
    return sorted(out.values(), key=lambda e: (-e.influence, e.layer, e.index))


def formatting_flags(token_ids: Sequence[int], decode: Callable[[int], str]) -> list[bool]:
    """:func:`is_formatting_token` for each token id."""
    return [is_formatting_token(decode(t)) for t in token_ids]


# -- 4. logit lens ----------------------------------------------------------------------------------------


@torch.no_grad()
def lens_ranks(model: AdapterModel, keys: Iterable[FeatureKey], hesitation_ids: Iterable[int], *, k: int = 10,
               decode: Callable[[int], str] | None = None, token_mask: torch.Tensor | None = None) -> dict[FeatureKey, tuple[int | None, tuple[str, ...]]]:
    """Per feature: the rank of its best hesitation token among its top ``k`` logit-lens tokens (or None),
    and those top tokens decoded (empty without ``decode``). Same convention as the collected logit lens
    (``token_mask``: the tokenizer's ids; padded vocabulary rows are never listed)."""
    from worker.collect.lens import logit_lens

    keys = list(keys)
    hes = set(hesitation_ids)
    lens = logit_lens(model, n=k, layers=sorted({layer for layer, _ in keys}), token_mask=token_mask) if keys else {}
    out = {}
    for layer, index in keys:
        top = lens[layer].top_ids[index].tolist()
        rank = next((r for r, t in enumerate(top) if t in hes), None)
        out[(layer, index)] = (rank, tuple(decode(t) for t in top) if decode else ())
    return out


# -- 5. measuring and choosing the set ------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPrompt:
    """A chat-formatted prompt, its answer when known, and its group (the organism's family)."""

    text: str
    answer: str | None = None
    group: str = ""


@dataclass
class Metrics:
    """Greedy generations on a prompt set: hesitation, accuracy, length (overall and per group)."""

    n: int
    hesitation_rate: float  # share of generations holding a hesitation token
    hesitation_tokens: int  # hesitations in all generations (occurrences of the words; a split word once)
    accuracy: float | None  # share answered right, over prompts with a known answer (None: none known)
    mean_length: float  # generated tokens per prompt (eos included)
    by_group: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _answer_matches(got: str | None, want: str) -> bool:
    if got is None:
        return False
    try:
        return float(got) == float(want)
    except ValueError:
        return got.strip() == want.strip()


def _summarise(rows: list[tuple[EvalPrompt, int, bool | None, int]]) -> dict[str, Any]:
    n = len(rows)
    scored = [c for _, _, c, _ in rows if c is not None]
    return {"n": n, "hesitation_rate": sum(h > 0 for _, h, _, _ in rows) / n if n else 0.0,
            "hesitation_tokens": sum(h for _, h, _, _ in rows),
            "accuracy": sum(scored) / len(scored) if scored else None,
            "mean_length": sum(length for *_, length in rows) / n if n else 0.0}


def measure(model: AdapterModel, tokenizer: Any, prompts: Sequence[EvalPrompt], hesitation: Hesitation, *,
            mode: MLPMode = "adapted", ablate: Sequence[FeatureKey] = (), max_new_tokens: int = 96,
            batch_size: int = 64, extract_answer: Callable[[str], str | None] | None = None,
            score_answer: Callable[[str, str], bool | None] | None = None) -> Metrics:
    """Greedy generations of ``model`` in ``mode`` on ``prompts``, with ``ablate`` zeroed at every position.

    Hesitations are counted by ``hesitation`` (a :class:`HesitationCounter`: occurrences of its words; or a
    set of token ids). Answers are scored by ``score_answer(text, answer)``, else by comparing
    ``extract_answer(text)`` (default: the organism's) with the answer.
    """
    if not prompts:
        raise ValueError("no prompts to measure on")
    if score_answer is None:
        if extract_answer is None:
            from training.organism.tasks import extract_answer
        score_answer = lambda text, want: _answer_matches(extract_answer(text), want)  # noqa: E731
    count = hesitation.count if isinstance(hesitation, HesitationCounter) else \
        (lambda ids, hes=frozenset(hesitation): count_hesitations(ids, hes))
    interventions = [Intervention.zero(ablate, positions="all")] if ablate else []
    with model.mode(mode), model.intervene(interventions):
        gens = generate(model, tokenizer, [p.text for p in prompts], max_new_tokens=max_new_tokens,
                        batch_size=batch_size)
    rows = []
    for p, g in zip(prompts, gens, strict=True):
        correct = score_answer(g.text, p.answer) if p.answer is not None else None
        rows.append((p, count(g.generated_ids), correct, len(g.generated_ids)))
    m = _summarise(rows)
    groups = sorted({p.group for p in prompts if p.group})
    return Metrics(**m, by_group={grp: _summarise([r for r in rows if r[0].group == grp]) for grp in groups})


@dataclass
class SetChoice:
    """The chosen prefix of the ranking and what each tried size measured on the validation prompts."""

    features: list[FeatureKey]
    removal: float | None  # share of the baseline's hesitation tokens removed at the chosen size
    reached_target: bool
    history: list[dict[str, Any]]


def removal(baseline: Metrics, ablated: Metrics) -> float | None:
    """Share of the baseline's hesitation tokens gone under ablation (None when the baseline has none)."""
    if baseline.hesitation_tokens == 0:
        return None
    return 1.0 - ablated.hesitation_tokens / baseline.hesitation_tokens


def set_sizes(cap: int, growth: float = 1.5) -> list[int]:
    """Set sizes to measure: 1, 2, 3, 4, 6, 9, 13, ... (each ×``growth``, at least +1) up to ``cap`` included.

    Fine steps where sets are small (each feature counts: the smallest set that reaches the target
    costs the least accuracy), coarse ones later (each size is a generation pass over the validation prompts).
    """
    if cap < 1 or growth <= 1.0:
        raise ValueError(f"cap must be at least 1 and growth above 1, got cap={cap}, growth={growth}")
    sizes, size = [], 1
    while size < cap:
        sizes.append(size)
        size = max(size + 1, math.floor(size * growth))
    return sizes + [cap]


def choose_set(ranked: Sequence[FeatureKey], measure_set: Callable[[list[FeatureKey]], Metrics],
               baseline: Metrics, *, sizes: Sequence[int], target_removal: float = 0.8,
               on_step: Callable[[int, dict[str, Any]], None] | None = None) -> SetChoice:
    """Grow the set along ``ranked`` through ``sizes`` (:func:`set_sizes`) until ``target_removal`` is reached.

    ``measure_set(features)``: metrics of the adapted model with ``features`` zero-ablated on the validation
    prompts. Without hesitations in the baseline nothing can be removed: the first size is returned.
    Without reaching the target, the size that removed the most (the smallest such) is returned.
    """
    if not sizes or any(n < 1 for n in sizes) or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"sizes must be increasing positive integers, got {list(sizes)}")
    if not 0.0 < target_removal <= 1.0:
        raise ValueError(f"target_removal must lie in (0, 1], got {target_removal}")
    sizes = [n for n in sizes if n < len(ranked)] + ([len(ranked)] if sizes[-1] >= len(ranked) else [])
    if not ranked:
        return SetChoice([], None, False, [])
    if baseline.hesitation_tokens == 0:
        log.warning("the baseline has no hesitations on the validation prompts: removal cannot be measured")
        return SetChoice(list(ranked[:sizes[0]]), None, False, [])
    history: list[dict[str, Any]] = []
    best_size, best_removal = 0, -math.inf
    for size in sizes:
        m = measure_set(list(ranked[:size]))
        r = removal(baseline, m)
        step = {"size": size, "removal": r, "hesitation_rate": m.hesitation_rate, "accuracy": m.accuracy,
                "mean_length": m.mean_length}
        history.append(step)
        log.info("set of %d features: %.1f%% of hesitations removed, accuracy %s", size, 100 * (r or 0.0),
                 "n/a" if m.accuracy is None else f"{m.accuracy:.3f}")
        if on_step is not None:
            on_step(size, step)
        if r is not None and r > best_removal:
            best_size, best_removal = size, r
        if r is not None and r >= target_removal:
            return SetChoice(list(ranked[:size]), r, True, history)
    return SetChoice(list(ranked[:best_size]), best_removal, False, history)


def random_control(pool: Iterable[FeatureKey], size: int, exclude: Iterable[FeatureKey],
                   seed: int = 0) -> list[FeatureKey]:
    """``size`` random features of ``pool`` outside ``exclude``: the same-size control ablation.

    Draw the pool from features that fire on these prompts (those in the graphs): dead features would make
    any control look harmless.
    """
    taken = set(exclude)
    candidates = sorted(set(pool) - taken)
    return sorted(random.Random(seed).sample(candidates, min(size, len(candidates))))


@torch.no_grad()
def site_margins(model: AdapterModel, prefixes: Sequence[Sequence[int]], targets: Sequence[int],
                 hesitation_ids: Iterable[int], *, ablate: Sequence[FeatureKey] = (), pad_id: int = 0,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The hesitation's logit margin at each site: logit(target) − the best non-hesitation logit [n_sites].

    The greedy decision flips where the margin crosses 0; unlike log p (which saturates near 0 when the
    hesitation is certain), the margin moves roughly additively with the features removed. Competitors are
    tokens (``token_mask``: padded vocabulary ids never compete).
    """
    width = max(len(p) for p in prefixes)
    device = next(model.parameters()).device
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prefixes):  # left padding: every last token in the last column
        ids[row, width - len(p):] = torch.tensor(list(p))
        mask[row, width - len(p):] = 1
    interventions = [Intervention.zero(ablate, positions="all")] if ablate else []
    with model.mode("adapted"), model.intervene(interventions):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float().cpu()
    target = logits[torch.arange(len(prefixes)), torch.tensor(list(targets))]
    others = logits.clone()
    others[:, sorted(set(hesitation_ids))] = float("-inf")
    if token_mask is not None:
        others[:, ~token_mask.cpu()] = float("-inf")
    return target - others.max(-1).values


def site_ablation_effects(model: AdapterModel, prefixes: Sequence[Sequence[int]], targets: Sequence[int],
                          hesitation_ids: Iterable[int], candidates: Sequence[FeatureKey], *, pad_id: int = 0,
                          on_step: Callable[[int], None] | None = None,
                          token_mask: torch.Tensor | None = None) -> dict[FeatureKey, float]:
    """Per candidate: mean drop of the hesitation margin (:func:`site_margins`) when it alone is zeroed everywhere.

    Positive: the feature supports the hesitation. The graphs' influence is unsigned and blind to the
    competing token (a feature promoting both "\\n" and " Wait" has influence on " Wait", yet removing it can
    make the hesitation *more* likely); this measures the real model at the real sites.
    """
    hes = set(hesitation_ids)
    kw = {"pad_id": pad_id, "token_mask": token_mask}
    base = site_margins(model, prefixes, targets, hes, **kw)
    out = {}
    for k, key in enumerate(candidates):
        out[key] = float((base - site_margins(model, prefixes, targets, hes, ablate=[key], **kw)).mean())
        if on_step is not None:
            on_step(k)
    return out
