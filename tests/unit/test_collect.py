"""Feature collection against brute force: every statistic recomputed with Python loops over every token."""

from __future__ import annotations

import bisect
import json
import math
import random

import pytest
import torch

from tests.helpers import randomize_adapters, tiny_pair
from training.adapter import build_adapter_model
from training.chat import ASSISTANT, THINK_END, THINK_START, USER, Region, thinking_positions
from training.config import AdapterConfig
from worker.collect import CollectionResult, Corpus, FeatureStats, Markers, collect, merge_results
from worker.collect.lens import decoder_neighbours, logit_lens
from worker.collect.runner import think_bins
from worker.collect.stats import HIST_EDGES, N_HIST, BatchInfo, pack_loc, quantile_band_edges, quantile_bands

N_FEATURES = 12
MARKERS = Markers(assistant_id=3, think_start_id=4, think_end_id=5)
CTX = (3, 2)
# Collection's padded batch and the brute-force reference's sequence-alone forward agree to float32 rounding,
# not bit for bit, although the test model is float64: transformers computes eager attention's softmax in
# float32 whatever the dtype, and a kernel's blocking (so its sums' order) depends on batch shape and threads.
ACT_REL = 1e-5


@pytest.fixture(scope="module", params=[N_FEATURES, 16], ids=["F12", "F16"])
def model(request):
    """A tiny float64 adapter model (exact enough that padding cannot change any comparison); 16 features: the
    statistics' power-of-two path (token and feature of an entry by shift and mask)."""
    torch.set_num_threads(1)
    base, target = tiny_pair(0, dtype=torch.float64)
    m = build_adapter_model(base, target, AdapterConfig(n_features=request.param))
    randomize_adapters(m, seed=1)
    with torch.no_grad():
        for ad in m.adapters:  # sparser: about a third of the (token, feature) pairs fire
            ad.b_enc.sub_(0.15)
        m.adapters[1].W_dec[:, 7] = 0  # a feature with no decoder direction (no neighbours)
    return m


def _chat_sequence(g: random.Random) -> list[int]:
    """<prompt> <assistant> [<think> thinking [</think>]] answer, marker ids 3/4/5, other ids from 6."""
    def words(n: int) -> list[int]:
        return [g.randrange(6, 64) for _ in range(n)]

    seq = [1] + words(g.randrange(0, 6)) + [3]
    shape = g.random()
    if shape < 0.8:
        seq += [4] + words(g.randrange(0, 12))
        if shape < 0.6:
            seq += [5]
    return seq + words(g.randrange(0, 8))


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    g = random.Random(7)
    seqs = [_chat_sequence(g) for _ in range(14)] + [[9], [10, 11]]
    return Corpus.from_sequences(seqs, markers=MARKERS)


def _brute_force(model, corpus: Corpus) -> dict[int, dict]:
    """Per layer: every (value, seq, pos, feature) with f > 0, from one unpadded forward per sequence."""
    out = {layer: {"acts": {}, "hits": []} for layer in range(model.n_layers)}
    with torch.no_grad(), model.capture() as store:
        for i in range(len(corpus)):
            store.clear()
            model.hf.model(input_ids=corpus[i].long().unsqueeze(0), use_cache=False)
            for layer in range(model.n_layers):
                f = store[layer][0][0]  # [seq, F]
                out[layer]["acts"][i] = f
                for pos in range(f.shape[0]):
                    for feat in range(f.shape[1]):
                        v = float(f[pos, feat])
                        if v > 0:
                            out[layer]["hits"].append((v, i, pos, feat))
    return out


@pytest.fixture(scope="module")
def brute(model, corpus):
    return _brute_force(model, corpus)


@pytest.fixture(scope="module")
def result(model, corpus) -> CollectionResult:
    return collect(model, corpus, top_k=4, n_random=3, ctx_before=CTX[0], ctx_after=CTX[1], batch_size=5,
                   max_batch_tokens=64, seed=3)


def test_counts_frequency_hist_regions_match_brute_force(model, corpus, brute, result) -> None:
    n_tokens = corpus.n_tokens
    regions = {i: corpus.regions_of(i).tolist() for i in range(len(corpus))}
    think = {i: thinking_positions([Region(r) for r in regions[i]]) for i in range(len(corpus))}
    edges = HIST_EDGES.tolist()
    for layer in range(model.n_layers):
        s = result.stats[layer]
        hits = brute[layer]["hits"]
        assert 0.1 < len(hits) / (n_tokens * model.n_features) < 0.7  # sparse but not empty
        assert int(s.n_tokens) == n_tokens
        for feat in range(model.n_features):
            mine = [h for h in hits if h[3] == feat]
            assert int(s.count[feat]) == len(mine)
            assert float(s.frequency()[feat]) == len(mine) / n_tokens
            if mine:
                assert float(s.act_max[feat]) == pytest.approx(max(h[0] for h in mine), rel=ACT_REL)
                assert float(s.mean_act()[feat]) == pytest.approx(sum(h[0] for h in mine) / len(mine), rel=ACT_REL)
            hist = [0] * N_HIST
            reg = [0] * len(Region)
            tpos = [0] * 10
            for v, i, pos, _ in mine:
                hist[bisect.bisect_right(edges, v)] += 1
                reg[regions[i][pos]] += 1
                if think[i][pos] is not None:
                    tpos[min(math.floor(think[i][pos] * 10 + 1e-9), 9)] += 1
            assert s.hist[feat].tolist() == hist
            assert s.regions[feat].tolist() == reg
            assert s.think_hist[feat].tolist() == tpos
    all_regions = [r for i in range(len(corpus)) for r in regions[i]]
    assert result.stats[0].region_tokens.tolist() == [all_regions.count(r) for r in range(len(Region))]
    assert sum(result.stats[0].regions.sum(0).tolist()) > 0 and result.stats[0].regions[:, Region.THINKING].sum() > 0


def test_top_k_matches_brute_force(model, corpus, brute, result) -> None:
    for layer in range(model.n_layers):
        s = result.stats[layer]
        for feat in range(model.n_features):
            expected = sorted((h for h in brute[layer]["hits"] if h[3] == feat), key=lambda h: (-h[0], h[1], h[2]))[:4]
            got = list(result.examples(layer, feat))
            got_top = [e for e in got if e.kind == "top"]
            assert [(e.sequence, e.position) for e in got_top] == [(h[1], h[2]) for h in expected]
            for e, h in zip(got_top, expected, strict=True):
                assert e.value == pytest.approx(h[0], rel=ACT_REL)
            for e in got:  # windows: token ids and this feature's activations around the focus
                toks = corpus[e.sequence].tolist()
                lo, hi = max(0, e.position - CTX[0]), min(len(toks), e.position + CTX[1] + 1)
                assert e.token_ids == toks[lo:hi]
                assert e.focus == e.position - lo and e.token_ids[e.focus] == toks[e.position]
                ref = brute[layer]["acts"][e.sequence][lo:hi, feat].tolist()
                assert e.acts == pytest.approx(ref, rel=ACT_REL, abs=1e-7)
                assert e.acts[e.focus] == pytest.approx(e.value)
            assert int((s.top.loc[feat] >= 0).sum()) == min(4, int(s.count[feat]))


def test_random_examples_are_nonzero_occurrences(model, brute, result) -> None:
    for layer in range(model.n_layers):
        s = result.stats[layer]
        for feat in range(model.n_features):
            occurrences = {(h[1], h[2]): h[0] for h in brute[layer]["hits"] if h[3] == feat}
            rand = [e for e in result.examples(layer, feat) if e.kind == "random"]
            assert len(rand) == min(3, len(occurrences))
            assert len({(e.sequence, e.position) for e in rand}) == len(rand)  # without replacement
            for e in rand:
                assert e.value > 0 and e.value == pytest.approx(occurrences[(e.sequence, e.position)], rel=ACT_REL)
        assert int((s.random.loc >= 0).sum()) > 0


def test_quantile_examples_sample_every_activation_band(model, brute, result) -> None:
    """Per (feature, band): min(n_quantile, occurrences in the band) distinct occurrences, each in its band."""
    edges = quantile_band_edges()
    k = result.stats[0].quantile.k
    seen_bands = set()
    for layer in range(model.n_layers):
        for feat in range(model.n_features):
            occurrences = {(h[1], h[2]): h[0] for h in brute[layer]["hits"] if h[3] == feat}
            per_band: dict[int, int] = {}
            for v in occurrences.values():
                band = int(quantile_bands(torch.tensor([v]))[0])
                per_band[band] = per_band.get(band, 0) + 1
            qs = [e for e in result.examples(layer, feat) if e.kind == "quantile"]
            got: dict[int, list] = {}
            for e in qs:
                got.setdefault(e.rank // 100, []).append(e)
            assert {b: len(es) for b, es in got.items()} == {b: min(k, n) for b, n in per_band.items()}
            for band, es in got.items():
                seen_bands.add(band)
                assert len({(e.sequence, e.position) for e in es}) == len(es)
                for e in es:
                    assert edges[band] <= e.value < edges[band + 1]
                    assert e.value == pytest.approx(occurrences[(e.sequence, e.position)], rel=ACT_REL)
    assert len(seen_bands) >= 2  # the fixture's activations span several bands


def test_shards_merge_to_the_single_pass(model, corpus) -> None:
    kw = {"top_k": 3, "n_random": 2, "ctx_before": 2, "ctx_after": 1, "batch_size": 1, "seed": 11}
    whole = collect(model, corpus, **kw)
    parts = [collect(model, corpus, shard=(i, 3), **kw) for i in range(3)]
    assert parts[0].lens is not None and parts[1].lens is None
    merged = merge_results(parts[2], parts[0], parts[1])
    assert merged.complete and not parts[1].complete and merged.n_sequences == len(corpus)
    for layer in range(model.n_layers):
        a, b = whole.stats[layer], merged.stats[layer]
        for name in ("n_tokens", "region_tokens", "think_tokens", "count", "act_max", "hist", "regions", "think_hist"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.allclose(a.act_sum, b.act_sum, rtol=1e-12)
        for kind in ("top", "random", "quantile"):
            ka, kb = getattr(a, kind), getattr(b, kind)
            assert torch.equal(ka.loc, kb.loc) and torch.equal(ka.key, kb.key), kind
            for name in ("value", "acts", "tokens"):
                assert torch.equal(ka.data[name], kb.data[name]), (kind, name)
    with pytest.raises(ValueError, match="more than one result"):
        merge_results(parts[0], parts[0])
    other_split = collect(model, corpus, shard=(1, 2), **kw)
    with pytest.raises(ValueError, match="different splits"):
        merge_results(parts[0], other_split)


def test_batching_does_not_change_the_result(model, corpus, result) -> None:
    again = collect(model, corpus, top_k=4, n_random=3, ctx_before=CTX[0], ctx_after=CTX[1], batch_size=16,
                    max_batch_tokens=10_000, seed=3)
    for layer in range(model.n_layers):
        assert torch.equal(again.stats[layer].top.loc, result.stats[layer].top.loc)
        assert torch.equal(again.stats[layer].random.loc, result.stats[layer].random.loc)
        assert torch.equal(again.stats[layer].quantile.loc, result.stats[layer].quantile.loc)
        assert torch.equal(again.stats[layer].hist, result.stats[layer].hist)


def _feed(stats: FeatureStats, f: torch.Tensor, seq_ids: list[int]) -> None:
    rows, width = f.shape[:2]
    pos = torch.arange(width)
    stats.update(f, BatchInfo(
        valid=torch.ones(rows, width, dtype=torch.bool), loc=pack_loc(torch.tensor(seq_ids).unsqueeze(1), pos),
        region=torch.zeros(rows, width, dtype=torch.long), think_bin=torch.full((rows, width), -1),
        lengths=torch.full((rows,), width),
    ))


def test_ties_keep_the_earliest_locations_in_any_order() -> None:
    f = torch.tensor([[[2.0, 1.0], [3.0, 1.0], [2.0, 0.0]],
                      [[3.0, 1.0], [2.0, 1.0], [0.0, 1.0]]])  # [2 sequences, 3 positions, 2 features]
    kept = []
    for order in ([0, 1], [1, 0]):
        s = FeatureStats.empty(0, 2, top_k=3, n_random=0, ctx_before=0, ctx_after=0)
        for row in order:
            _feed(s, f[row:row + 1], [row])
        kept.append(s.sort_examples().top.loc.clone())
    assert torch.equal(kept[0], kept[1])
    loc = kept[0]
    as_pairs = [[(int(x) >> 24, int(x) & 0xFFFFFF) for x in row] for row in loc]
    assert as_pairs[0] == [(0, 1), (1, 0), (0, 0)]  # 3, 3 (earlier first), then the first 2
    assert as_pairs[1] == [(0, 0), (0, 1), (1, 0)]  # five equal ones: the three earliest


def test_reservoir_is_uniform_over_occurrences() -> None:
    n_occ, k, trials = 40, 4, 300
    f = torch.zeros(4, 12, 1)
    where = torch.randperm(48, generator=torch.Generator().manual_seed(0))[:n_occ]
    f.view(-1)[where] = torch.rand(n_occ, generator=torch.Generator().manual_seed(1)) + 0.01
    hits = torch.zeros(48)
    for seed in range(trials):
        s = FeatureStats.empty(0, 1, top_k=0, n_random=k, ctx_before=0, ctx_after=0, seed=seed)
        for row in range(4):  # four batches, as a stream
            _feed(s, f[row:row + 1], [row])
        loc = s.random.loc[0]
        assert bool((loc >= 0).all())
        flat = (loc >> 24) * 12 + (loc & 0xFFFFFF)
        hits[flat] += 1
    assert set(hits.nonzero().squeeze(1).tolist()) <= set(where.tolist())  # only nonzero occurrences
    expected = trials * k / n_occ
    chi2 = float(((hits[where] - expected) ** 2 / expected).sum())
    assert chi2 < 72.0  # 39 degrees of freedom: p ≈ 0.001


def test_think_bins_match_chat_thinking_positions() -> None:
    g = random.Random(0)
    rows = [[g.choice([0, 2, 2, 2, 3, 4]) for _ in range(30)] for _ in range(20)]
    got = think_bins(torch.tensor(rows))
    for row, bins in zip(rows, got.tolist(), strict=True):
        ref = thinking_positions([Region(r) for r in row])
        assert bins == [-1 if p is None else min(math.floor(p * 10 + 1e-9), 9) for p in ref]


def test_logit_lens_convention(model, monkeypatch) -> None:
    monkeypatch.setattr("worker.collect.lens._CHUNK_ELEMENTS", 64 * 5)  # 5 features per chunk
    lens = logit_lens(model, n=4)
    W_U, g = model.hf.lm_head.weight, model.hf.model.norm.weight
    for layer in range(model.n_layers):
        for feat in range(model.n_features):
            if (layer, feat) == (1, 7):  # zero decoder: every token ties, any order is right
                assert lens[layer].top_values[feat].abs().max() == 0
                continue
            v = W_U @ (g * model.adapters[layer].W_dec[:, feat])
            v = v - v.mean()
            order = sorted(range(v.numel()), key=lambda i: -float(v[i]))
            assert lens[layer].top_ids[feat].tolist() == order[:4]
            assert lens[layer].bottom_ids[feat].tolist() == order[::-1][:4]
            assert lens[layer].top_values[feat].tolist() == pytest.approx(v[order[:4]].tolist(), rel=1e-5)


def test_hesitation_lens_is_the_largest_lens_value_among_the_hesitation_tokens(model, monkeypatch) -> None:
    monkeypatch.setattr("worker.collect.lens._CHUNK_ELEMENTS", 64 * 5)
    hes = [5, 17, 40]
    lens = logit_lens(model, n=4, hesitation_ids=hes + [10**6])  # ids outside the head are ignored
    W_U, g = model.hf.lm_head.weight, model.hf.model.norm.weight
    for layer in range(model.n_layers):
        v = W_U @ (g.unsqueeze(1) * model.adapters[layer].W_dec)  # [V, F]
        v = v - v.mean(0)
        assert lens[layer].hesitation.tolist() == pytest.approx(v[hes].max(0).values.tolist(), rel=1e-5, abs=1e-7)
    assert logit_lens(model, n=4)[0].hesitation is None


def test_decoder_neighbours_match_brute_force(model, monkeypatch) -> None:
    monkeypatch.setattr("worker.collect.lens._CHUNK_ELEMENTS", 24 * 5)
    nb = decoder_neighbours(model, n=3)
    cols = [(layer, i, model.adapters[layer].W_dec[:, i]) for layer in range(model.n_layers) for i in range(model.n_features)]
    for layer in range(model.n_layers):
        for feat in range(model.n_features):
            me = model.adapters[layer].W_dec[:, feat]
            if layer == 1 and feat == 7:
                assert nb[layer].layer[feat].tolist() == [-1, -1, -1]
                continue
            sims = sorted(((float(torch.dot(me, w) / (me.norm() * w.norm())), lay, i) for lay, i, w in cols
                           if (lay, i) != (layer, feat) and w.norm() > 0), reverse=True)[:3]
            assert list(zip(nb[layer].layer[feat].tolist(), nb[layer].index[feat].tolist(), strict=True)) == \
                [(lay, i) for _, lay, i in sims]
            assert nb[layer].cosine[feat].tolist() == pytest.approx([c for c, _, _ in sims], rel=1e-6)
            assert (1, 7) not in [(lay, i) for _, lay, i in sims]


def test_save_and_load_round_trip(result, tmp_path) -> None:
    path = tmp_path / "shard.pt"
    result.save(path)
    back = CollectionResult.load(path)
    assert back.layers == result.layers and back.meta == result.meta and back.shards == [(0, 1)]
    for layer in result.layers:
        assert torch.equal(back.stats[layer].hist, result.stats[layer].hist)
        assert torch.equal(back.stats[layer].top.data["tokens"], result.stats[layer].top.data["tokens"])
        assert torch.equal(back.lens[layer].top_ids, result.lens[layer].top_ids)
        assert torch.equal(back.neighbours[layer].cosine, result.neighbours[layer].cosine)
    assert list(back.examples(0, 2)) == list(result.examples(0, 2))


def test_bad_arguments_are_clear(model, corpus) -> None:
    with pytest.raises(ValueError, match="shard"):
        collect(model, corpus, shard=(3, 3))
    with pytest.raises(ValueError, match="layers"):
        collect(model, corpus, layers=[5])
    with pytest.raises(ValueError, match="top_k"):
        collect(model, corpus, top_k=-1)
    with pytest.raises(ValueError, match="vocabulary"):
        collect(model, [[1, 2, 500]])
    with pytest.raises(ValueError, match="regions"):
        Corpus.from_sequences([[1, 2]], regions=[[0]])


def test_progress_callback_and_layer_subset(model, corpus) -> None:
    calls = []
    r = collect(model, corpus, layers=[1], top_k=1, n_random=1, progress=lambda d, t, m: calls.append((d, t)))
    assert r.layers == [1] and calls[-1] == (len(corpus), len(corpus))


# -- corpus sources ---------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "2", "+", "=", "4", "so", "the", "answer", "is"]
    specials = [USER, ASSISTANT, THINK_START, THINK_END]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def test_jsonl_text_and_prompt_answer_rows(tmp_path) -> None:
    tok = _tokenizer()
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": f"{USER} 2 + 2 {ASSISTANT}{THINK_START} so 4 {THINK_END} 4"},
            {"prompt": "2 + 2 =", "answer": f"{THINK_START} so the answer {THINK_END} 4"},
            {"prompt": "2 + 2", "answer": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    c = Corpus.from_jsonl(path, tok)
    ids = {name: tok.convert_tokens_to_ids(name) for name in (USER, ASSISTANT, THINK_START, THINK_END)}
    assert len(c) == 3
    assert c[0].tolist() == [ids[USER], 2, 3, 2, ids[ASSISTANT], ids[THINK_START], 6, 5, ids[THINK_END], 5]
    P, S, T, E, A = (int(r) for r in Region)
    assert c.regions_of(0).tolist() == [P, P, P, P, P, S, T, T, E, A]
    assert c.regions_of(1).tolist() == [P, P, P, P, S, T, T, T, E, A]  # prompt ends with its last token
    assert c.regions_of(2).tolist() == [P, P, P, A]
    with pytest.raises(ValueError, match="neither"):
        Corpus.from_rows([{"question": "x"}], tok)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        Corpus.from_jsonl(path, tok)


def test_hf_dataset_source(tmp_path) -> None:
    tok = _tokenizer()
    try:
        import datasets
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            Corpus.from_hf_dataset(tmp_path, tok)
        return
    datasets.Dataset.from_list([{"text": "2 + 2 = 4"}]).save_to_disk(str(tmp_path / "ds"))
    c = Corpus.from_hf_dataset(tmp_path / "ds", tok)
    assert c[0].tolist() == [2, 3, 2, 4, 5]


def test_corpus_windows_are_cut_at_sequence_ends() -> None:
    c = Corpus.from_sequences([[5, 6, 7], [8, 9]])
    w = c.windows(torch.tensor([0, 1]), torch.tensor([0, 1]), 1, 1)
    assert w.tolist() == [[-1, 5, 6], [8, 9, -1]]


def test_hist_bins_equal_bucketize_at_and_between_edges() -> None:
    from worker.collect.stats import hist_bins

    for dtype in (torch.float32, torch.float64):
        edges = HIST_EDGES.to(dtype)
        v = torch.cat([edges, torch.nextafter(edges, torch.zeros_like(edges)), torch.logspace(-5, 4, 20001, dtype=dtype),
                       torch.tensor([1e-30, 3e38, float("inf"), torch.finfo(dtype).smallest_normal / 4], dtype=dtype)])
        assert torch.equal(hist_bins(v), torch.bucketize(v, edges, right=True))


def test_quantile_bands_are_every_fifth_histogram_edge_from_1e_2() -> None:
    """A value's band follows from its histogram bin; check it against the band edges directly."""
    finite = torch.tensor(quantile_band_edges()[1:-1]).float()
    v = torch.cat([finite, torch.nextafter(finite, torch.zeros_like(finite)), torch.logspace(-5, 4, 20001),
                   torch.tensor([1e-30, 3e38, float("inf")])])
    assert torch.equal(quantile_bands(v), torch.bucketize(v, finite, right=True))


def test_prefilter_keeps_the_exact_answer(model, corpus, result, monkeypatch) -> None:
    monkeypatch.setattr("worker.collect.kept.PREFILTER_FACTOR", 0)  # every batch goes through the prefilter
    again = collect(model, corpus, top_k=4, n_random=3, ctx_before=CTX[0], ctx_after=CTX[1], batch_size=5,
                    max_batch_tokens=64, seed=3)
    for layer in range(model.n_layers):
        for kind in ("top", "random"):
            a, b = getattr(again.stats[layer], kind), getattr(result.stats[layer], kind)
            assert torch.equal(a.loc, b.loc) and torch.equal(a.data["acts"], b.data["acts"])


def test_vectorised_region_labels_equal_label_regions() -> None:
    g = random.Random(3)
    for _ in range(300):
        ids = [g.choice([3, 4, 5, 6, 7, 8]) for _ in range(g.randrange(0, 25))]
        pl = g.choice([None, g.randrange(0, 30)])
        assert MARKERS.label_tensor(torch.tensor(ids, dtype=torch.long), pl).tolist() == \
            [int(r) for r in MARKERS.label(ids, pl)], (ids, pl)


def test_bfloat16_model_collects(corpus) -> None:
    base, target = tiny_pair(0, dtype=torch.bfloat16)
    m = randomize_adapters(build_adapter_model(base, target, AdapterConfig(n_features=N_FEATURES)), seed=1)
    r = collect(m, corpus, top_k=3, n_random=2, ctx_before=2, ctx_after=1)
    s = r.stats[0]
    assert s.top.data["acts"].dtype == torch.bfloat16 and s.top.data["value"].dtype == torch.float32
    assert int(s.count.sum()) > 0 and int(s.hist.sum()) == int(s.count.sum())
    for feat in range(N_FEATURES):
        top = [e for e in r.examples(0, feat) if e.kind == "top"]
        assert [e.value for e in top] == sorted((e.value for e in top), reverse=True)
        assert all(e.acts[e.focus] == e.value > 0 for e in top)


def test_summary_and_an_empty_shard(model, corpus, result) -> None:
    summary = result.summary()
    json.dumps(summary)
    assert summary["n_tokens"] == corpus.n_tokens and sum(summary["region_tokens"].values()) == corpus.n_tokens
    l0 = float(result.stats[1].count.sum()) / corpus.n_tokens
    assert summary["layers"]["1"]["l0"] == pytest.approx(l0) and summary["settings"]["top_k"] == 4
    calls = []
    empty = collect(model, corpus, shard=(len(corpus) + 3, len(corpus) + 4), progress=lambda *a: calls.append(a))
    assert empty.n_sequences == 0 and int(empty.stats[0].n_tokens) == 0 and calls == [(0, 0, "empty corpus")]
    assert list(empty.examples(0, 0)) == [] and empty.lens is None


def test_progress_may_stop_the_pass_cleanly(model, corpus, monkeypatch) -> None:
    monkeypatch.setattr("worker.collect.runner.PROGRESS_INTERVAL", 0.0)

    def stop(done: int, total: int, message: str) -> None:
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        collect(model, corpus, batch_size=2, progress=stop)
    assert model.state.captures is None and model.state.mode == "adapted"
    assert all(not mlp._forward_hooks for mlp in model.mlps)


def test_load_corpus_sources(tmp_path, corpus) -> None:
    from worker.collect import load_corpus

    corpus.save(tmp_path / "c.pt")
    back = load_corpus(tmp_path / "c.pt")
    assert torch.equal(back.tokens, corpus.tokens) and torch.equal(back.regions, corpus.regions)
    assert load_corpus(corpus) is corpus
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "2 + 2"}) + "\n")
    with pytest.raises(ValueError, match="tokenizer"):
        load_corpus(tmp_path / "c.jsonl")
    assert load_corpus(tmp_path / "c.jsonl", _tokenizer())[0].tolist() == [2, 3, 2]
    plain = load_corpus([[7, 3, 4, 8]], _tokenizer())  # markers from the tokenizer: 3, 4 are not markers there
    assert plain.regions_of(0).tolist() == [0, 0, 0, 0]
