"""Attribution engine on tiny random adapter models: exactness (float64), interventions, real ablations.

The models have non-uniform attention (larger weights, 4 heads over 2 KV heads), nonzero q/k/v biases,
non-unit norm gains and random adapter encoders/decoders with nonzero biases, so that every frozen
quantity and every constant term of the linearisation matters.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_ids, tiny_pair
from training.adapter import AdapterModel, build_adapter_model
from training.config import AdapterConfig
from training.interventions import Intervention
from worker.attribution.engine import attribute, select_logits
from worker.attribution.graph import Graph, compute_node_influence
from worker.attribution.linearize import default_feature_acts, linear_forward, linearize

MODES = ("relp", "frozen-mlp")
BOS = 1  # tiny_qwen2's bos_token_id


def adapter_model(seed: int = 0, *, layers: int = 3, d: int = 32, n_features: int = 48, dec_scale: float = 0.15,
                  dtype: torch.dtype = torch.float64) -> AdapterModel:
    """A tiny adapter model with every parameter that the linearisation freezes or sums made non-trivial."""
    base, target = tiny_pair(seed, layers=layers, d=d, init_std=0.3)
    model = build_adapter_model(base, target, AdapterConfig(n_features=n_features))
    g = torch.Generator().manual_seed(seed + 100)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(0.3 * rnd(proj.bias.shape))
            layer.input_layernorm.weight.copy_(1 + 0.3 * rnd(d))
            layer.post_attention_layernorm.weight.copy_(1 + 0.3 * rnd(d))
        model.hf.model.norm.weight.copy_(1 + 0.3 * rnd(d))
        for ad in model.adapters:
            ad.W_enc.copy_(rnd(ad.W_enc.shape) / d**0.5)
            ad.b_enc.copy_(0.5 * rnd(n_features) - 0.7)
            ad.W_dec.copy_(dec_scale * rnd(ad.W_dec.shape))
            ad.b_dec.copy_(0.1 * rnd(d))
    return model.to(dtype)


@pytest.fixture(scope="module")
def model() -> AdapterModel:
    return adapter_model()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    x = random_ids(3, batch=1, seq=9)[0]
    x[0] = BOS
    return x


@pytest.fixture(scope="module")
def graphs(model, ids) -> dict[str, Graph]:
    return {m: attribute(model, ids, mode=m, progress=False, batch_size=5) for m in MODES}


def target_rows(graph: Graph) -> torch.Tensor:
    """Node indices of rows that are targets (features and logits; token rows are empty)."""
    n = graph.n_feature_nodes
    return torch.cat([torch.arange(n), torch.arange(graph.n_nodes - graph.n_logits, graph.n_nodes)])


def values_of(graph: Graph, out) -> torch.Tensor:
    """Every target's value from a :func:`linear_forward` output, in the graph's row order."""
    vals = torch.zeros(graph.n_nodes, dtype=torch.float64)
    fl = graph.feature_nodes
    vals[: graph.n_feature_nodes] = torch.stack(out.pre_acts)[fl[:, 0], fl[:, 1], fl[:, 2]]
    vals[graph.n_nodes - graph.n_logits:] = out.logits_demeaned[graph.logit_tokens]
    return vals


def test_own_forward_matches_hugging_face(model, ids):
    lin = linearize(model, ids, "relp")
    with torch.no_grad(), model.capture() as caps:
        hf = model(ids[None]).logits[0, -1]
    # HF's RMSNorm computes in float32, our forward in float64: agreement to float32 precision
    assert torch.allclose(lin.logits, hf, atol=1e-5, rtol=0)
    acts = default_feature_acts(lin)
    for layer in range(model.n_layers):
        f = caps[layer][0][0].clone()
        f[0] = 0  # BOS position excluded
        assert torch.allclose(acts[layer], f, atol=1e-5)
    assert lin.bos_excluded and int((lin.feat_pos == 0).sum()) == 0
    assert 0.05 < (lin.feat_act.numel() / (model.n_layers * ids.numel() * model.n_features)) < 0.5
    # attention is far from uniform, so freezing patterns is a real test
    A = lin.patterns[:, :, -1, :]
    assert float((A.max(-1).values - A.min(-1).values).min()) > 0.05


@pytest.mark.parametrize("mode", MODES)
def test_completeness_float64(graphs, model, ids, mode):
    """Each target's incoming edges + its explicit constants = its value in the linearised model."""
    graph = graphs[mode]
    lin = linearize(model, ids, mode)
    rows = target_rows(graph)
    lhs = graph.adjacency_matrix.sum(1) + graph.constant_contributions + graph.dropped_contributions
    value = values_of(graph, linear_forward(lin))
    assert torch.allclose(graph.target_values[rows], value[rows], rtol=1e-12, atol=1e-12)
    err = (lhs[rows] - value[rows]).abs() / value[rows].abs()
    assert float(err.max()) < 1e-6
    assert float(graph.dropped_contributions.abs().max()) == 0.0  # every active feature is a node here
    # the constants are what the linear model gives with every source off, computed independently
    zero_src = linear_forward(lin, embeds=torch.zeros_like(lin.embeds),
                              feature_acts=[torch.zeros_like(a) for a in default_feature_acts(lin)],
                              errors=torch.zeros_like(lin.error_vectors) if lin.error_vectors is not None else None)
    const = values_of(graph, zero_src)
    assert torch.allclose(graph.constant_contributions[rows], const[rows], atol=1e-10)
    assert float(const[rows].abs().min()) > 0  # biases matter: the check above is not vacuous


@pytest.mark.parametrize("mode", MODES)
def test_every_edge_equals_its_intervention(graphs, model, ids, mode):
    """Zeroing one source with everything else frozen changes each target by minus the edge."""
    graph = graphs[mode]
    lin = linearize(model, ids, mode)
    base_vals = values_of(graph, linear_forward(lin))
    rows = target_rows(graph)
    acts = default_feature_acts(lin)
    n_feat = graph.n_feature_nodes
    gen = torch.Generator().manual_seed(0)
    sources = torch.randperm(n_feat, generator=gen)[:25].tolist() + [graph.token_node_index(p)
                                                                      for p in range(ids.numel())]
    if graph.n_error_nodes:  # frozen-mlp: every error node of two layers
        sources += [graph.error_node_index(layer, p) for layer in (0, model.n_layers - 1) for p in range(ids.numel())]
    worst = 0.0
    for src in sources:
        if src < n_feat:
            layer, pos, idx = graph.feature_nodes[src].tolist()
            edited = [a.clone() for a in acts]
            edited[layer][pos, idx] = 0.0
            out = linear_forward(lin, feature_acts=edited)
        elif src < graph.token_start:
            layer, pos = divmod(src - n_feat, graph.n_pos)
            errors = lin.error_vectors.clone()
            errors[layer, pos] = 0.0
            out = linear_forward(lin, errors=errors)
        else:
            emb = lin.embeds.clone()
            emb[src - graph.token_start] = 0.0
            out = linear_forward(lin, embeds=emb)
        delta = values_of(graph, out) - base_vals
        err = (delta[rows] + graph.adjacency_matrix[rows, src]).abs().max()
        worst = max(worst, float(err))
    assert worst < 1e-10
    assert float(graph.adjacency_matrix.abs().max()) > 1e-2  # edges are not all zero


def test_frozen_mlp_error_nodes_reconstruct_every_pre_activation(graphs, model, ids):
    """frozen-mlp: the error nodes are the real model's base-MLP outputs, and per target row the feature,
    error and token edges plus the biases give the real model's pre-activation (logit) exactly."""
    graph = graphs["frozen-mlp"]
    lin = linearize(model, ids, "frozen-mlp")
    base_out = {}
    hooks = [layer.mlp.base_mlp.register_forward_hook(lambda _m, _i, out, i=i: base_out.__setitem__(i, out[0]))
             for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad(), model.capture() as caps:
            hf_logits = model(ids[None]).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    # error node (l, t) carries the base MLP's output there (zero at the excluded BOS, which is a constant)
    for layer in range(model.n_layers):
        assert torch.allclose(lin.error_vectors[layer, 1:], base_out[layer][1:], atol=1e-6)
        assert float(lin.error_vectors[layer, 0].abs().max()) == 0.0
    n_feat, n_err = graph.n_feature_nodes, graph.n_error_nodes
    assert n_err == model.n_layers * ids.numel()
    A = graph.adjacency_matrix
    parts = {"features": A[:, :n_feat].sum(1), "errors": A[:, n_feat:graph.token_start].sum(1),
             "tokens": A[:, graph.token_start:graph.logit_start].sum(1)}
    assert all(float(p.abs().max()) > 1e-3 for p in parts.values())  # each kind of source matters
    assert int(A[:, n_feat:graph.token_start].abs().sum(0).count_nonzero()) > n_err / 2  # errors are real sources
    total = parts["features"] + parts["errors"] + parts["tokens"] + graph.constant_contributions
    assert float(graph.dropped_contributions.abs().max()) == 0.0
    # feature rows: the pre-activation (= activation of an active feature) in the real model
    real_acts = torch.tensor([float(caps[layer][0][0][pos, idx]) for layer, pos, idx in graph.feature_nodes.tolist()],
                             dtype=torch.float64)
    assert torch.allclose(total[:n_feat], real_acts, rtol=1e-5, atol=1e-6)  # HF's float32 norms
    assert torch.allclose(total[:n_feat], graph.feature_activations, rtol=1e-12, atol=1e-12)
    logit_rows = slice(graph.logit_start, graph.n_nodes)
    hf_demeaned = (hf_logits - hf_logits.mean())[graph.logit_tokens]
    assert torch.allclose(total[logit_rows], hf_demeaned, rtol=1e-5, atol=1e-5)
    assert torch.allclose(total[logit_rows], graph.target_values[logit_rows], rtol=1e-12, atol=1e-12)
    # error and token rows are empty: they are sources only, as in circuit-tracer
    assert float(A[n_feat:graph.logit_start].abs().max()) == 0.0


def test_frozen_mlp_edges_differ_from_relp(graphs):
    """The two modes are different linearisations (a bug routing both through one path would pass the rest)."""
    relp, frozen = graphs["relp"], graphs["frozen-mlp"]
    assert relp.n_error_nodes == 0 and frozen.n_error_nodes == frozen.n_layers * frozen.n_pos
    keep = [i for i in range(frozen.n_nodes) if not frozen.n_feature_nodes <= i < frozen.token_start]
    a, b = relp.adjacency_matrix, frozen.adjacency_matrix[keep][:, keep]  # same nodes, without the errors
    assert a.shape == b.shape
    assert float((a - b).abs().max()) > 1e-3


def test_chunking_and_jacobians_do_not_change_rows(model, ids):
    """Chunk size and the per-position MLP Jacobians are speed choices only."""
    one = attribute(model, ids, mode="relp", progress=False, batch_size=1, jacobian_budget_mb=0)
    many = attribute(model, ids, mode="relp", progress=False, batch_size=1000)
    chunked = attribute(model, ids, mode="relp", progress=False, batch_size=3)  # many chunks through the Jacobians
    assert one.settings["mlp_jacobians"] == 0 and many.settings["mlp_jacobians"] > 0
    assert chunked.settings["mlp_jacobians"] > 0
    for g in (many, chunked):
        assert torch.allclose(one.adjacency_matrix, g.adjacency_matrix, atol=1e-12)
        assert torch.allclose(one.constant_contributions, g.constant_contributions, atol=1e-12)


def test_float32_close_to_float64(ids):
    g64 = attribute(adapter_model(dtype=torch.float64), ids, progress=False)
    g32 = attribute(adapter_model(dtype=torch.float32), ids, progress=False)
    assert torch.equal(g32.selected_features, g64.selected_features)
    scale = float(g64.adjacency_matrix.abs().max())
    assert float((g32.adjacency_matrix.double() - g64.adjacency_matrix).abs().max()) < 1e-4 * scale


def test_zero_ablation_in_real_model_matches_graph(ids):
    """Zero-ablating top-attributed features in the real model moves the top logit as the graph predicts.

    The graph's prediction for removing a set S is the linearised total effect: -a_S propagated through
    the edge derivatives (edge / source activation) to the logit. The real model also moves attention
    patterns and norm scales, so single features agree only roughly on random tiny models; the test asks
    for the direction of most, a strong correlation, and the size of group ablations within a factor 2.
    """
    model = adapter_model(dec_scale=0.05)  # small feature effects: the regime where linearisation holds
    graph = attribute(model, ids, mode="relp", progress=False)
    logit_row = graph.n_nodes - graph.n_logits  # the most probable token
    tok = int(graph.logit_tokens[0])
    n_feat = graph.n_feature_nodes
    acts = graph.feature_activations
    deriv = graph.adjacency_matrix[:n_feat, :n_feat] / acts[None, :]
    to_logit = graph.adjacency_matrix[logit_row, :n_feat] / acts

    def predicted(members: list[int]) -> float:
        delta = torch.zeros(n_feat, dtype=torch.float64)
        delta[members] = -acts[members]
        for _ in range(model.n_layers + 1):  # layer by layer through the acyclic graph
            nxt = deriv @ delta
            nxt[members] = -acts[members]
            delta = nxt
        return float(to_logit @ delta)

    def real(members: list[int]) -> float:
        feats = graph.feature_nodes[members].tolist()
        ivs = [Intervention.zero([(layer, idx)], positions=(pos,)) for layer, pos, idx in feats]
        with torch.no_grad():
            clean = model(ids[None]).logits[0, -1]
            with model.intervene(ivs):
                ablated = model(ids[None]).logits[0, -1]
        return float((ablated[tok] - ablated.mean()) - (clean[tok] - clean.mean()))

    direct = graph.adjacency_matrix[logit_row, :n_feat]
    top = direct.abs().argsort(descending=True)[:10].tolist()
    pred = torch.tensor([predicted([i]) for i in top])
    obs = torch.tensor([real([i]) for i in top])
    assert int((pred * obs > 0).sum()) >= 8, (pred, obs)
    assert float(torch.corrcoef(torch.stack([pred, obs]))[0, 1]) > 0.7, (pred, obs)
    for group in (direct.argsort(descending=True)[:5].tolist(), direct.argsort()[:5].tolist()):
        p, r = predicted(group), real(group)
        assert 0.5 < r / p < 2.0, f"group {group}: graph predicts {p:+.4f}, ablation gives {r:+.4f}"


def test_feature_cap_keeps_the_most_influential(model, ids):
    full = attribute(model, ids, mode="relp", progress=False)
    n_active = full.n_feature_nodes
    cap = n_active // 3
    capped = attribute(model, ids, mode="relp", progress=False, max_feature_nodes=cap, round_size=16)
    assert capped.n_feature_nodes == cap and capped.settings["rounds"] > 1
    # completeness still holds with the non-node features summed separately
    rows = target_rows(capped)
    lhs = capped.adjacency_matrix.sum(1) + capped.constant_contributions + capped.dropped_contributions
    assert torch.allclose(lhs[rows], capped.target_values[rows], rtol=1e-9, atol=1e-12)
    assert float(capped.dropped_contributions.abs().max()) > 0
    infl = compute_node_influence(full.adjacency_matrix, full.logit_weights())[:n_active]
    best = set(infl.argsort(descending=True)[:cap].tolist())
    chosen = set(capped.selected_features.tolist())
    assert len(best & chosen) >= 0.7 * cap
    worst = set(infl.argsort()[:cap].tolist())
    assert len(worst & chosen) <= 0.1 * cap


def test_logit_targets_and_forced_token(model, ids):
    lin = linearize(model, ids, "relp")
    probs = torch.softmax(lin.logits, -1)
    ids_, p = select_logits(lin.logits, 10, 0.95)
    assert float(p.sum()) >= 0.95 or len(ids_) == 10
    assert float(p[:-1].sum()) < 0.95
    rare = int(probs.argmin())
    graph = attribute(model, ids, progress=False, max_n_logits=3, target_token=rare)
    assert graph.n_logits == 3 and int(graph.logit_tokens[-1]) == rare
    assert graph.logit_node_index(rare) == graph.n_nodes - 1
    assert graph.target_token == rare


def test_bos_only_excluded_when_first_token_is_bos(model, ids):
    other = ids.clone()
    other[0] = 5
    assert not linearize(model, other).bos_excluded
    assert int((linearize(model, other).feat_pos == 0).sum()) > 0
    assert int((linearize(model, ids).feat_pos == 0).sum()) == 0
    assert int((linearize(model, ids, exclude_bos=False).feat_pos == 0).sum()) > 0


def test_bad_input_is_a_clear_error(model, ids):
    with pytest.raises(ValueError, match="mode"):
        attribute(model, ids, mode="relu", progress=False)
    with pytest.raises(ValueError, match="1-D"):
        attribute(model, torch.stack([ids, ids]), progress=False)
    with pytest.raises(ValueError, match="target_token"):
        attribute(model, ids, target_token=10**6, progress=False)
    with pytest.raises(ValueError, match="max_feature_nodes"):
        attribute(model, ids, max_feature_nodes=0, progress=False)
    with pytest.raises(ValueError, match="token ids"):
        attribute(model, torch.tensor([1, 999]), progress=False)


def test_padded_vocabulary_ids_never_become_logit_nodes(model, ids):
    """A model whose vocab_size is padded past its tokenizer: ids at or above the tokenizer's size are no tokens,
    however large their logits (random padding rows often have large ones)."""
    logits = torch.zeros(64, dtype=torch.float64)
    logits[60:] = 10.0  # padding rows, the most probable by far
    logits[5], logits[7] = 3.0, 2.0
    ids_, p = select_logits(logits, 5, 0.95, n_real_tokens=60)
    assert ids_.tolist()[:2] == [5, 7] and int(ids_.max()) < 60
    assert float(p.sum()) < 0.05  # probabilities stay those of the whole output
    ids_, _ = select_logits(logits, 3, 0.95, target_token=9, n_real_tokens=60, extra_tokens=(11,))
    assert ids_.tolist() == [5, 9, 11]  # forced tokens take the places of the least probable
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(model, ids, target_token=62, n_real_tokens=60, progress=False)
    graph = attribute(model, ids, progress=False, n_real_tokens=40, max_n_logits=20, desired_logit_prob=1.0)
    assert int(graph.logit_tokens.max()) < 40 and graph.n_logits == 20
