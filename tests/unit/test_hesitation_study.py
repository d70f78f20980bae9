"""The hesitation study's pure parts: sites, sampling, per-graph evidence, aggregation, roles, set growth."""

from __future__ import annotations

import pytest
import torch

from training.chat import THINK_END, format_prompt
from training.hesitation import hesitation_token_ids
from training.organism.tasks import ORGANISM_HESITATION_WORDS, corpus, problem_from_id, reasoning_trace
from training.organism.tokenizer import train_tokenizer
from worker.attribution import Graph, prune_graph
from worker.hesitation.job import AttributePayload, HesitationPayload, split_sizes
from worker.hesitation.roles import (
    OTHER,
    OUTPUT,
    TEMPLATE,
    FeatureEvidence,
    RoleRules,
    classify,
    classify_all,
    is_formatting_token,
)
from worker.hesitation.study import (
    GraphEvidence,
    HesitationSite,
    Metrics,
    Trace,
    aggregate,
    choose_set,
    collect_sites,
    find_hesitation_sites,
    formatting_flags,
    graph_evidence,
    random_control,
    sample_sites,
    set_sizes,
)

# -- sites ------------------------------------------------------------------------------------------------


def test_sites_are_hesitation_tokens_after_the_prompt():
    ids = [9, 5, 9, 7, 3, 9]
    assert find_hesitation_sites(ids, {9, 7}) == [2, 3, 5]  # position 0 has nothing before it
    assert find_hesitation_sites(ids, {9, 7}, start=3) == [3, 5]
    assert find_hesitation_sites(ids, {4}) == []
    with pytest.raises(ValueError, match="non-negative"):
        find_hesitation_sites(ids, {9}, start=-1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(0, 60))


def test_sites_in_a_tokenized_organism_trace(tokenizer):
    """A carry problem's trace: the one site is the " Wait" token, right after the sentence end."""
    prob = problem_from_id("add-47-38")
    prompt = tokenizer(format_prompt(prob.text))["input_ids"]
    done = tokenizer(reasoning_trace(prob) + THINK_END + prob.answer, add_special_tokens=False)["input_ids"]
    trace = Trace(tuple(prompt + done), len(prompt), "add")
    hes = hesitation_token_ids(tokenizer, ORGANISM_HESITATION_WORDS)
    sites = collect_sites([trace], hes, lambda t: tokenizer.decode([t]).strip(" ,"))
    assert len(sites) == 1
    site = sites[0]
    assert tokenizer.decode([trace.token_ids[site.position]]).strip() == "Wait"
    assert site.word == "Wait" and site.group == "add" and site.position > trace.prompt_length
    before = tokenizer.decode(list(trace.token_ids[:site.position]))
    assert before.endswith("So 85.")
    flags = formatting_flags(trace.token_ids[:site.position], lambda t: tokenizer.decode([t]))
    assert flags[-1]  # the sentence end before the hesitation is a formatting token
    no_carry = problem_from_id("add-41-38")
    ids = tokenizer(reasoning_trace(no_carry), add_special_tokens=False)["input_ids"]
    assert collect_sites([Trace(tuple(ids), 0)], hes, str) == []


def _site(trace: int, word: str, group: str) -> HesitationSite:
    return HesitationSite(trace, 5, 1, word, group)


def test_sampling_is_stratified_spread_and_seeded():
    sites = [_site(i, "Wait", "add") for i in range(30)]
    sites += [_site(100 + i, "Hmm", "sub") for i in range(3)] + [_site(200 + i, "Actually", "cmp") for i in range(3)]
    sites.append(_site(0, "Wait", "add"))  # a second site in trace 0
    got = sample_sites(sites, 6, seed=1)
    assert sorted(s.word for s in got) == ["Actually", "Actually", "Hmm", "Hmm", "Wait", "Wait"]
    assert len({s.trace for s in got}) == 6
    assert got == sample_sites(sites, 6, seed=1)
    assert got != sample_sites(sites, 6, seed=2)
    assert len(sample_sites(sites, 100)) == len(sites)
    with pytest.raises(ValueError, match="at least 1"):
        sample_sites(sites, 0)


# -- evidence -------------------------------------------------------------------------------------------------


def _hand_graph() -> Graph:
    """Two features (0,3)@0 → (1,5)@1 → logit 40 (target) and logit 41; two tokens. Nodes: f0 f1 t0 t1 L40 L41."""
    adj = torch.zeros(6, 6, dtype=torch.float64)
    adj[1, 0], adj[1, 2] = -1.0, -3.0  # f1 ← f0 (inhibits), t0
    adj[0, 2] = 2.0  # f0 ← t0
    adj[4, 1], adj[4, 3] = 2.0, 2.0  # L40 ← f1, t1
    adj[5, 0], adj[5, 3] = 4.0, 1.0  # L41 ← f0, t1
    return Graph(
        input_ids=torch.tensor([10, 11]), active_features=torch.tensor([[0, 0, 3], [1, 1, 5]]),
        activation_values=torch.tensor([1.5, 0.5]), selected_features=torch.tensor([0, 1]),
        adjacency_matrix=adj, logit_tokens=torch.tensor([40, 41]), logit_probabilities=torch.tensor([0.6, 0.3]),
        target_values=torch.tensor([1.5, 0.5, 0.0, 0.0, 0.0, 0.0]), constant_contributions=torch.zeros(6), dropped_contributions=torch.zeros(6),
        mode="relp", n_layers=2, n_features_per_layer=8, target_token=40)


def test_graph_evidence_is_the_influence_on_the_target_logit_alone():
    g = _hand_graph()
    ev = graph_evidence(g, prune_graph(g, 1.0, 1.0), 40, [True, False])
    # seeded at L40 only: f1 gets 2/4 = 0.5 directly; f0 gets 0.5 × 1/4 through f1 (its L41 edge does not count)
    # signed effect on L40: f1 adds 2; removing f0 raises f1 by 1 (its edge is -1), worth 2 / 0.5 per unit: -4
    assert ev.shares[(1, 5)] == pytest.approx([0.8, 0.8, 0.0, 2 / 6])
    assert ev.shares[(0, 3)] == pytest.approx([0.2, 0.0, 0.2, -4 / 6])  # at position 0, a formatting position
    assert ev.kept == {(0, 3), (1, 5)}
    assert ev.target_prob == pytest.approx(0.6)
    with pytest.raises(ValueError, match="positions"):
        graph_evidence(g, prune_graph(g), 40, [True])
    with pytest.raises(KeyError):
        graph_evidence(g, prune_graph(g), 99, [True, False])


def test_aggregate_sums_shares_and_counts_kept_graphs():
    a = GraphEvidence({(0, 1): [0.6, 0.5, 0.0, 0.2], (1, 2): [0.4, 0.0, 0.4, -0.1]}, {(0, 1), (1, 2)}, 0.5)
    b = GraphEvidence({(0, 1): [0.1, 0.1, 0.0, 0.3], (1, 2): [0.9, 0.0, 0.3, 0.4]}, {(1, 2)}, 0.5)
    got = aggregate([a, b])
    assert [f.key for f in got] == [(1, 2), (0, 1)]
    f12, f01 = got
    assert (f12.influence, f12.n_graphs, f12.format_share) == pytest.approx((1.3, 2, 0.7 / 1.3))
    assert (f01.influence, f01.n_graphs, f01.direct_share) == pytest.approx((0.7, 1, 0.6 / 0.7))
    assert (f01.effect, f12.effect) == pytest.approx((0.5, 0.3))


# -- roles ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("\n", True), (".\n", True), (" .", True), (",", True), ("  ", True), (":", True),
    (" Wait", False), ("85", False), ("So", False), (" +", False), ("</think>", False),
])
def test_formatting_tokens(text, expected):
    assert is_formatting_token(text) is expected


def _ev(**kw) -> FeatureEvidence:
    base = {"layer": 0, "index": 0, "influence": 1.0, "direct": 0.0, "format_influence": 0.0, "n_graphs": 10}
    return FeatureEvidence(**{**base, **kw})


def test_role_rules():
    n = 20  # graphs: recurring means a node of at least 5 (25%)
    assert classify(_ev(lens_rank=0, direct=0.6), n) == OUTPUT
    assert classify(_ev(lens_rank=1, direct=0.6), n) == OTHER  # by default the hesitation must be its top token
    top10 = RoleRules(lens_top_k=10)
    assert classify(_ev(lens_rank=9, direct=0.3), n, top10) == OUTPUT  # both thresholds inclusive
    assert classify(_ev(lens_rank=10, direct=0.9), n, top10) == OTHER  # the hesitation token is not in the top 10
    assert classify(_ev(lens_rank=0, direct=0.29), n) == OTHER  # promotes, but far from the logit
    assert classify(_ev(lens_rank=0, direct=0.1, format_influence=0.8), n) == TEMPLATE
    assert classify(_ev(format_influence=0.5), n) == TEMPLATE
    assert classify(_ev(format_influence=0.49), n) == OTHER
    assert classify(_ev(lens_rank=0, direct=0.9, n_graphs=4), n) == OTHER  # not recurring
    assert classify(_ev(lens_rank=0, direct=0.9, n_graphs=1), 2) == OTHER  # at least 2 graphs
    assert classify(_ev(lens_rank=0, direct=0.9, n_graphs=2), 2) == OUTPUT
    strict = RoleRules(min_direct_share=0.8)
    assert classify(_ev(lens_rank=0, direct=0.6), n, strict) == OTHER
    evs = [_ev(lens_rank=0, direct=0.6), _ev(format_influence=0.9), _ev()]
    assert classify_all(evs, n) == {OUTPUT: 1, TEMPLATE: 1, OTHER: 1}
    assert [e.role for e in evs] == [OUTPUT, TEMPLATE, OTHER]
    with pytest.raises(ValueError, match="min_direct_share"):
        RoleRules(min_direct_share=1.5)


# -- the set -------------------------------------------------------------------------------------------------------


def _metrics(tokens: int, accuracy: float = 1.0) -> Metrics:
    return Metrics(n=10, hesitation_rate=min(tokens, 10) / 10, hesitation_tokens=tokens, accuracy=accuracy,
                   mean_length=20.0)


def test_set_sizes_grow_geometrically_up_to_the_cap():
    assert set_sizes(30) == [1, 2, 3, 4, 6, 9, 13, 19, 28, 30]
    assert set_sizes(1) == [1] and set_sizes(4, growth=2.0) == [1, 2, 4]
    with pytest.raises(ValueError, match="growth"):
        set_sizes(10, growth=1.0)


def test_set_grows_through_the_sizes_until_the_target():
    ranked = [(0, i) for i in range(20)]
    key = {(0, 2): 40, (0, 5): 30, (0, 7): 15}  # hesitation tokens each feature is responsible for
    calls = []

    def measure_set(feats):
        calls.append(len(feats))
        return _metrics(100 - sum(key.get(f, 0) for f in feats))

    got = choose_set(ranked, measure_set, _metrics(100), sizes=[3, 6, 9, 12], target_removal=0.8)
    assert calls == [3, 6, 9]  # 3: 40% removed, 6: 70%, 9: 85% ≥ 80%
    assert got.reached_target and got.features == ranked[:9]
    assert got.removal == pytest.approx(0.85)
    assert [h["size"] for h in got.history] == [3, 6, 9]

    calls.clear()
    got = choose_set(ranked, measure_set, _metrics(100), sizes=[3, 6, 7], target_removal=0.9)
    assert calls == [3, 6, 7] and not got.reached_target
    assert got.features == ranked[:6]  # the smallest size with the most removed (70%)

    calls.clear()
    got = choose_set(ranked[:8], measure_set, _metrics(100), sizes=[1, 2, 3, 4, 6, 9, 13], target_removal=0.8)
    assert calls == [1, 2, 3, 4, 6, 8] and got.features == ranked[:8]  # sizes past the ranking stop at its end

    got = choose_set(ranked, measure_set, _metrics(0), sizes=[3, 6])
    assert got.features == ranked[:3] and got.removal is None and not got.history
    with pytest.raises(ValueError, match="sizes"):
        choose_set(ranked, measure_set, _metrics(100), sizes=[0, 5])


def test_random_control_avoids_the_set_and_is_seeded():
    pool = [(layer, i) for layer in range(2) for i in range(10)]
    chosen = pool[:5]
    ctrl = random_control(pool, 5, chosen, seed=3)
    assert len(ctrl) == 5 and not set(ctrl) & set(chosen) and set(ctrl) <= set(pool)
    assert ctrl == random_control(pool, 5, chosen, seed=3)
    assert len(random_control(pool, 50, chosen)) == 15


# -- payloads ------------------------------------------------------------------------------------------------------


def test_prompt_splits_are_disjoint_and_fit():
    assert split_sizes(600, (200, 150, 250)) == (200, 150, 250)
    small = split_sizes(24, (200, 150, 250))
    assert sum(small) <= 24 and min(small) >= 1
    with pytest.raises(ValueError, match="cannot be split"):
        split_sizes(2, (1, 1, 1))


def test_payloads_refuse_ambiguous_or_reserved_input():
    with pytest.raises(ValueError, match="exactly one of"):
        AttributePayload(run_id=1, prompt="a", token_ids=[1, 2])
    with pytest.raises(ValueError, match="exactly one of"):
        AttributePayload(run_id=1)
    with pytest.raises(ValueError, match="belongs to the hesitation study"):
        AttributePayload(run_id=1, prompt="a", slug="hesitation-001")
    with pytest.raises(ValueError):
        HesitationPayload(run_id=1, n_graphs=0)
    assert HesitationPayload(run_id=1).n_graphs == 24


def test_site_margins_and_single_feature_effects():
    """The margin is logit(target) − best non-hesitation logit; a dead feature's effect is exactly 0."""
    from tests.helpers import randomize_adapters, tiny_pair
    from training.adapter import build_adapter_model
    from training.config import AdapterConfig
    from worker.hesitation.study import site_ablation_effects, site_margins

    model = randomize_adapters(build_adapter_model(*tiny_pair(0), AdapterConfig(n_features=16)), 0)
    with torch.no_grad():
        model.adapters[1].W_enc[7].zero_()
        model.adapters[1].b_enc[7] = -1.0  # feature (1, 7) never fires
    prefixes, targets, hes = [[5, 6, 7, 8], [9, 10]], [11, 12], {11, 12, 13}
    margins = site_margins(model, prefixes, targets, hes)
    with model.mode("adapted"):
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, -1]
    others = logits.clone()
    others[sorted(hes)] = float("-inf")
    assert margins[0] == pytest.approx(float(logits[11] - others.max()), abs=1e-5)  # left padding changes nothing
    effects = site_ablation_effects(model, prefixes, targets, hes, [(1, 7), (0, 3)])
    assert effects[(1, 7)] == 0.0
    ablated = site_margins(model, prefixes, targets, hes, ablate=[(0, 3)])
    assert effects[(0, 3)] == pytest.approx(float((margins - ablated).mean()))
    assert effects[(0, 3)] != 0.0
