"""Writing a collection into features/examples on SQLite and Postgres: content, idempotence, transactions."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db.schema import Example, Feature, Prompt, Run
from tests.helpers import tiny_adapter_model
from training.chat import REGION_NAMES
from worker.collect import CollectionResult, Corpus, Markers, collect, write_collection
from worker.collect.stats import quantile_band_edges

QUANTILE_EDGES = quantile_band_edges()


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    seqs = [
        [1]
        + torch.randint(6, 64, (5,), generator=g).tolist()
        + [3, 4]
        + torch.randint(6, 64, (int(n),), generator=g).tolist()
        + [5, 9]
        for n in (3, 9, 14, 0, 6)
    ]
    return Corpus.from_sequences(seqs, markers=Markers(3, 4, 5))


@pytest.fixture(scope="module")
def result(corpus: Corpus) -> CollectionResult:
    torch.set_num_threads(1)
    model = tiny_adapter_model(0, n_features=8)
    return collect(
        model, corpus, top_k=3, n_random=2, ctx_before=4, ctx_after=2, n_neighbours=3, lens_tokens=2
    )


class _Tok:
    """The one tokenizer method the writer uses, spelled out (token strings for the logit lens)."""

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [f"<{i[0]}>" for i in ids]


def _run(engine: Engine, name: str = "r") -> int:
    with Session(engine) as session, session.begin():
        run = Run(name=name, base_model="b", target_model="t")
        session.add(run)
        session.flush()
        return run.id


def _counts(engine: Engine, run_id: int) -> tuple[int, int]:
    with engine.connect() as conn:
        n_f = conn.execute(
            select(func.count()).select_from(Feature).where(Feature.run_id == run_id)
        ).scalar_one()
        n_e = conn.execute(
            select(func.count()).select_from(Example).where(Example.run_id == run_id)
        ).scalar_one()
    return n_f, n_e


def test_rows_match_the_result(db_engine: Engine, result: CollectionResult) -> None:
    run_id = _run(db_engine)
    counts = write_collection(db_engine, run_id, result, _Tok())
    n_kept = sum(int((s.top.loc >= 0).sum() + (s.random.loc >= 0).sum() + (s.quantile.loc >= 0).sum())
                 for s in result.stats.values())
    assert counts["features"] == 2 * 8 and counts["examples"] == n_kept and n_kept > 20 and counts["feature_tokens"] > 0
    assert _counts(db_engine, run_id) == (16, n_kept)
    with Session(db_engine) as session:
        for layer in result.layers:
            s = result.stats[layer]
            for feat in range(8):
                row = session.get(Feature, (run_id, layer, feat))
                assert row.frequency == pytest.approx(float(s.frequency()[feat]))
                assert row.max_act == pytest.approx(float(s.act_max[feat]))
                assert row.mean_act == pytest.approx(float(s.mean_act()[feat]))
                assert row.histogram["counts"] == s.hist[feat].tolist()
                assert len(row.histogram["edges"]) == len(row.histogram["counts"]) + 1
                assert row.histogram["edges"][1] == pytest.approx(1e-3) and row.histogram["edges"][-2] == pytest.approx(100)
                assert row.region_counts == dict(zip(REGION_NAMES, s.regions[feat].tolist(), strict=True))
                assert row.think_pos_hist["counts"] == s.think_hist[feat].tolist()
                top_id = int(result.lens[layer].top_ids[feat, 0])
                assert (
                    row.logit_lens["top"][0][:2] == [top_id, f"<{top_id}>"]
                    and len(row.logit_lens["bottom"]) == 2
                )
                nb = result.neighbours[layer]
                assert [r[:2] for r in row.neighbours] == [
                    [int(a), int(b)] for a, b in zip(nb.layer[feat], nb.index[feat], strict=True)
                ]
                stored = session.scalars(
                    select(Example)
                    .where(Example.run_id == run_id, Example.layer == layer, Example.index == feat)
                    .order_by(Example.kind.desc(), Example.rank)
                ).all()
                expected = list(result.examples(layer, feat))
                assert [(e.kind, e.rank) for e in stored] == [(e.kind, e.rank) for e in expected]
                for db_ex, ex in zip(stored, expected, strict=True):
                    assert db_ex.token_ids == ex.token_ids and db_ex.focus == ex.focus
                    assert db_ex.acts == pytest.approx(ex.acts, abs=1e-5)
                    assert db_ex.acts[db_ex.focus] == pytest.approx(ex.value, abs=1e-5)
                    assert db_ex.max_act == pytest.approx(max(ex.acts))
                    if db_ex.kind == "quantile":  # its focus activation lies in its band
                        lo, hi = QUANTILE_EDGES[db_ex.rank // 100], QUANTILE_EDGES[db_ex.rank // 100 + 1]
                        assert lo <= ex.value < hi
                assert {e.kind for e in stored} >= {"top", "random"} if row.frequency else True


def test_rewrite_replaces_never_duplicates(db_engine: Engine, result: CollectionResult) -> None:
    run_id, other = _run(db_engine, "a"), _run(db_engine, "b")
    first = write_collection(db_engine, run_id, result)
    write_collection(db_engine, other, result)
    assert write_collection(db_engine, run_id, result) == first
    assert _counts(db_engine, run_id) == (first["features"], first["examples"])
    write_collection(db_engine, run_id, result, layers=[1])  # a layer subset replaces that layer only
    assert _counts(db_engine, run_id) == (first["features"], first["examples"])
    assert _counts(db_engine, other) == (first["features"], first["examples"])


def test_session_writes_in_the_callers_transaction(db_engine: Engine, result: CollectionResult) -> None:
    run_id = _run(db_engine)
    with Session(db_engine) as session:
        write_collection(session, run_id, result)
        session.rollback()
    assert _counts(db_engine, run_id) == (0, 0)
    with Session(db_engine) as session:
        write_collection(session, run_id, result)
        session.commit()
    assert _counts(db_engine, run_id)[0] == 16


def test_bad_targets_are_clear(db_engine: Engine, result: CollectionResult) -> None:
    with pytest.raises(ValueError, match="run 999 does not exist"):
        write_collection(db_engine, 999, result)
    with pytest.raises(ValueError, match="layers"):
        write_collection(db_engine, _run(db_engine), result, layers=[7])


def test_plain_json_fallback_stores_the_same(db_engine: Engine, result: CollectionResult, monkeypatch) -> None:
    from worker.collect import store

    run_a, run_b = _run(db_engine, "fast"), _run(db_engine, "plain")
    write_collection(db_engine, run_a, result)
    monkeypatch.setattr(store, "_orjson", None)
    write_collection(db_engine, run_b, result)
    with Session(db_engine) as session:
        def rows(run_id: int) -> list[tuple]:
            q = select(Example).where(Example.run_id == run_id).order_by(Example.layer, Example.index, Example.kind, Example.rank)
            return [(e.layer, e.index, e.kind, e.rank, e.token_ids, e.acts, e.focus, e.max_act) for e in session.scalars(q)]

        assert rows(run_a) == rows(run_b) and len(rows(run_a)) > 0


class _TextTok(_Tok):
    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [" ".join(f"t{i}" for i in seq) for seq in ids]


def test_examples_point_at_their_stored_sequences(db_engine: Engine, result: CollectionResult,
                                                  corpus: Corpus) -> None:
    """With the corpus, each example's sequence is a prompts row of the run (its ids, text and chat regions) and
    the example's window occurs in it at its stored position; a re-collection reuses the rows (no duplicates, same ids)."""
    from worker.collect.stats import POS_BITS

    run_id = _run(db_engine)
    counts = write_collection(db_engine, run_id, result, _TextTok(), corpus=corpus)
    with Session(db_engine) as session:
        prompts = {p.id: p for p in session.scalars(select(Prompt).where(Prompt.run_id == run_id))}
        examples = session.scalars(select(Example).where(Example.run_id == run_id)).all()
        assert counts["sources"] == len(prompts) > 1 and {p.source for p in prompts.values()} == {"collection"}
        by_ids = {tuple(p.token_ids): p for p in prompts.values()}
        assert len(by_ids) == len(prompts)
        for layer in result.layers:  # every kept example: its window sits in its stored sequence at its location
            s = result.stats[layer]
            for kept in (s.top, s.random):
                for feat, slot in (kept.loc >= 0).nonzero().tolist():
                    loc = int(kept.loc[feat, slot])
                    seq, pos = loc >> POS_BITS, loc & ((1 << POS_BITS) - 1)
                    row = by_ids[tuple(corpus[seq].tolist())]
                    assert row.text == " ".join(f"t{i}" for i in corpus[seq].tolist())
                    spans = row.regions
                    assert spans[0][0] == 0 and spans[-1][1] == len(row.token_ids)
                    assert [REGION_NAMES.index(name) for a, b, name in spans for _ in range(a, b)] == \
                        corpus.regions_of(seq).tolist()
                    assert pos < len(row.token_ids)
        for ex in examples:  # the window sits in its sequence with the focus at prompt_pos
            ids, start = prompts[ex.prompt_id].token_ids, ex.prompt_pos - ex.focus
            assert start >= 0 and ids[start:start + len(ex.token_ids)] == ex.token_ids, (ex.layer, ex.index, ex.kind)
    again = write_collection(db_engine, run_id, result, _TextTok(), corpus=corpus)
    assert again == counts
    with Session(db_engine) as session:
        assert set(session.scalars(select(Prompt.id).where(Prompt.run_id == run_id))) == set(prompts)
        assert {e.prompt_id for e in session.scalars(select(Example).where(Example.run_id == run_id))} == set(prompts)


def test_a_corpus_that_is_not_the_collections_is_refused(db_engine: Engine, result: CollectionResult,
                                                         corpus: Corpus) -> None:
    run_id = _run(db_engine)
    shifted = Corpus(corpus.tokens + 1, corpus.offsets, corpus.regions)  # same shape, other ids
    for wrong in (Corpus.from_sequences([[1, 2, 3]]), shifted):
        with pytest.raises(ValueError, match="not the corpus it was collected on"):
            write_collection(db_engine, run_id, result, corpus=wrong)
    assert _counts(db_engine, run_id) == (0, 0)
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(Prompt).where(Prompt.run_id == run_id)) == 0


def test_sources_over_the_limit_are_not_stored(db_engine: Engine, result: CollectionResult, corpus: Corpus,
                                               monkeypatch, caplog) -> None:
    from worker.collect import store

    monkeypatch.setattr(store, "SOURCE_TOKEN_LIMIT", 5)
    run_id = _run(db_engine)
    counts = write_collection(db_engine, run_id, result, corpus=corpus)
    assert counts["sources"] == 0 and counts["examples"] > 0 and "without links" in caplog.text
    with Session(db_engine) as session:
        assert session.scalar(select(func.count()).select_from(Example)
                              .where(Example.run_id == run_id, Example.prompt_id.is_not(None))) == 0


def test_identical_sequences_are_stored_once(db_engine: Engine) -> None:
    torch.set_num_threads(1)
    seq = [1, 7, 8, 3, 4, 9, 10, 11, 5, 12]
    corpus = Corpus.from_sequences([seq, [1, 13, 3, 4, 14, 5], seq], markers=Markers(3, 4, 5))
    result = collect(tiny_adapter_model(0, n_features=8), corpus, top_k=3, n_random=2, ctx_before=4, ctx_after=2)
    run_id = _run(db_engine)
    counts = write_collection(db_engine, run_id, result, corpus=corpus)
    with Session(db_engine) as session:
        rows = session.scalars(select(Prompt).where(Prompt.run_id == run_id)).all()
        assert sorted(tuple(p.token_ids) for p in rows) == sorted({tuple(seq), (1, 13, 3, 4, 14, 5)})
        assert counts["sources"] == 3  # three sequences, two of them one row
        linked = set(session.scalars(select(Example.prompt_id).where(Example.run_id == run_id)))
        assert linked == {p.id for p in rows}


def test_merged_shards_link_like_one_pass(db_engine: Engine, corpus: Corpus, result: CollectionResult) -> None:
    """Shards index the whole corpus: a merged result links every example to the same sequence and position as
    the one-pass result does."""
    from worker.collect import merge_results

    model = tiny_adapter_model(0, n_features=8)
    kw = {"top_k": 3, "n_random": 2, "ctx_before": 4, "ctx_after": 2, "n_neighbours": 3, "lens_tokens": 2}
    merged = merge_results(*(collect(model, corpus, shard=(i, 2), **kw) for i in range(2)))
    links = {}
    for name, res in (("one", result), ("merged", merged)):
        run_id = _run(db_engine, name)
        write_collection(db_engine, run_id, res, corpus=corpus)
        with Session(db_engine) as session:
                    links[name] = sorted((e.layer, e.index, e.kind, e.rank, tuple(session.get(Prompt, e.prompt_id).token_ids),
                                  e.prompt_pos)
                                 for e in session.scalars(select(Example).where(Example.run_id == run_id)))
    assert links["merged"] == links["one"] and links["one"]
