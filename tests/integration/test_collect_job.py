"""The collect job on the tiny trained run: one pass and sharded, through the real worker loop."""

from __future__ import annotations

from sqlalchemy import func, select

from app.db import queue
from app.db.schema import Example, Feature, Run
from app.db.session import make_engine, make_sessionmaker
from worker.loop import run_inline, run_worker


def _counts(settings) -> tuple[int, int, list]:
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        n_feat = s.scalar(select(func.count()).select_from(Feature).where(Feature.run_id == 1))
        n_ex = s.scalar(select(func.count()).select_from(Example).where(Example.run_id == 1))
        top = s.execute(select(Feature.layer, Feature.index, Feature.frequency, Feature.max_act)
                        .where(Feature.run_id == 1).order_by(Feature.layer, Feature.index)).all()
    engine.dispose()
    return n_feat, n_ex, top


def test_collect_fills_features_and_sharding_gives_the_same_stats(tiny_run_settings) -> None:
    settings = tiny_run_settings
    out = run_inline(settings, "collect", {"run_id": 1, "n_prompts": 12, "max_new_tokens": 24},
                     show_progress=False, handler_modules=["worker.pipeline", "worker.collect.job"])
    assert out["merged"] and out["sequences"] == 12
    n_feat, n_ex, single = _counts(settings)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        run = s.get(Run, 1)
        assert run.status == "collected" and n_feat == run.n_layers * run.n_features
        # every feature's hesitation lens: the organism's hesitation words have single-token spellings
        assert s.scalar(select(func.count()).select_from(Feature)
                        .where(Feature.run_id == 1, Feature.hesitation_lens.is_not(None))) == n_feat
    assert n_ex > 0

    # the same collection in 3 shards, run by a real worker loop: identical per-feature stats, no duplicates
    queue.enqueue(engine, "collect", {"run_id": 1, "n_prompts": 12, "max_new_tokens": 24, "n_shards": 3})
    run_worker(settings, wait=False, handler_modules=["worker.pipeline", "worker.collect.job"])
    engine.dispose()
    n_feat2, n_ex2, sharded = _counts(settings)
    assert (n_feat2, n_ex2) == (n_feat, n_ex)
    assert [(a, b) for a, b, *_ in sharded] == [(a, b) for a, b, *_ in single]
    for (_, _, f1, m1), (_, _, f2, m2) in zip(single, sharded, strict=True):
        assert abs(f1 - f2) < 1e-9 and abs(m1 - m2) < 1e-5
