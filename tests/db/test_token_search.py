"""Token search on features written by the collect job itself (not a seed), on SQLite and on Postgres.

The tiny trained organism is collected by the real ``collect`` handler into each backend; a token that some
feature's logit lens puts first is then searched by its text, as a user types it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Example, Feature, Run
from app.settings import Settings
from app.web.data.common import DATA_DIR_KEY
from app.web.data.features import FeatureQuery, feature_list
from app.web.tokens import find_vocab
from tests.organism_fixtures import collect_tiny_run


@pytest.fixture
def collected(db_url: str, tiny_run_settings: Settings) -> tuple[Settings, int]:
    """The tiny trained run copied into ``db_url``'s store and collected there (same models and checkpoint)."""
    return collect_tiny_run(db_url, tiny_run_settings, ["worker.collect.job"])


def test_promotes_search_finds_the_feature_whose_lens_puts_the_token_first(collected):
    from app.db.session import make_engine

    settings, run_id = collected
    engine = make_engine(settings)
    try:
        with Session(engine) as s:
            s.info[DATA_DIR_KEY] = settings.data_dir
            run = s.get(Run, run_id)
            vocab = find_vocab(None, run.target_model, settings.data_dir)
            firsts: dict[int, list[tuple[int, int]]] = {}
            for f in s.query(Feature).filter(Feature.run_id == run_id, Feature.frequency > 0):
                top = (f.logit_lens or {}).get("top") or []
                if top:
                    firsts.setdefault(int(top[0][0]), []).append((f.layer, f.index))
            wait = [t for t in firsts if vocab.token(t).exact.strip() == "Wait"]
            token = wait[0] if wait else max(firsts, key=lambda t: len(firsts[t]))  # " Wait" when a lens leads with it
            text = vocab.token(token).exact
            page = feature_list(s, run_id, FeatureQuery(promotes=text, limit=500))
            found = {(r.layer, r.index) for r in page.rows}
            assert token in page.search_ids["promotes"]
            assert set(firsts[token]) <= found, (text, firsts[token], found)
            for r in page.rows:  # and nothing that does not promote one of the searched ids
                f = s.get(Feature, (run_id, r.layer, r.index))
                top10 = {int(e[0]) for e in f.logit_lens["top"][:10]}
                assert top10 & set(page.search_ids["promotes"])
            strengths = [r.strength for r in page.rows]
            assert strengths == sorted(strengths, reverse=True)
            # "fires on": the focus token of a top example, as stored by collect
            ex = s.scalars(select(Example).where(Example.run_id == run_id, Example.kind == "top",
                                                 Example.rank == 0).limit(1)).one()
            focus_id = int(ex.token_ids[ex.focus])
            fires = feature_list(s, run_id, FeatureQuery(fires_on=f"#{focus_id}", limit=500))
            assert (ex.layer, ex.index) in {(r.layer, r.index) for r in fires.rows}
    finally:
        engine.dispose()
