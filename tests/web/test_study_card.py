"""The run page's study card reads only the strongest members of each role (issue 17: not the whole set's
logit lenses, and in one statement), and shows exactly what the full member list would: the first five per role, strongest first
(chosen by a window function in the database, on SQLite and Postgres)."""

from __future__ import annotations

import random

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.db.schema import FeatureSet, FeatureSetMember, Run
from app.db.session import make_engine
from app.web.data.common import DATA_DIR_KEY
from app.web.data.sets import ROLE_ORDER, TOP_PER_ROLE, members, study_card
from tests.seed import N_FEATURES, N_LAYERS, seed_world


def test_the_card_shows_the_strongest_members_per_role_of_a_large_set(db_url, tmp_path):
    engine = make_engine(db_url)
    try:
        world = seed_world(engine, tmp_path / "tok")
        rng = random.Random(3)
        with Session(engine) as s, s.begin():
            run = s.get(Run, world.run_id)
            hset = s.scalars(select(FeatureSet).where(FeatureSet.run_id == run.id)).first()
            set_id = hset.id
            taken = {(m.layer, m.index) for m in s.scalars(select(FeatureSetMember)
                                                           .where(FeatureSetMember.set_id == hset.id))}
            for layer in range(N_LAYERS):
                for index in range(N_FEATURES):
                    if (layer, index) not in taken:  # many members per role, ties in score included
                        s.add(FeatureSetMember(set_id=hset.id, layer=layer, index=index,
                                               role=rng.choice(["output", "template", None, "odd"]),
                                               score=rng.choice([0.5, rng.random(), None])))
        with Session(engine) as s:
            s.info[DATA_DIR_KEY] = None
            run = s.get(Run, world.run_id)
            full = members(s, run, set_id)
            seen: list[tuple] = []

            def capture(conn, cursor, statement, params, context, executemany):
                if "logit_lens" in statement:
                    seen.append((statement, params))

            event.listen(engine, "before_cursor_execute", capture)
            try:
                card = study_card(s, run)
            finally:
                event.remove(engine, "before_cursor_execute", capture)
        assert len(full) == N_LAYERS * N_FEATURES
        expected: dict[str, list] = {}
        for m in full:
            role = m.role if m.role in ROLE_ORDER else "other"
            if len(expected.setdefault(role, [])) < TOP_PER_ROLE:
                expected[role].append(m)
        assert card.top == expected and list(card.top) == [r for r in ROLE_ORDER if r in expected]
        assert all(len(v) == TOP_PER_ROLE for v in card.top.values())
        assert any(m.top_token for v in card.top.values() for m in v)  # the lens was read for the shown ones
        # ... and only for those: the one statement reading lenses joins the features to the members ranked
        # within their role and keeps ranks up to TOP_PER_ROLE (a bound parameter), not the whole set
        assert len(seen) == 1, [st for st, _ in seen]
        statement, params = seen[0]
        assert "row_number() OVER (PARTITION BY" in statement and "JOIN features" in statement, statement
        values = params.values() if isinstance(params, dict) else params
        assert TOP_PER_ROLE in values, params
    finally:
        engine.dispose()
