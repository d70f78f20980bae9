"""Feature labels on features the collect job wrote itself (the tiny trained organism), on SQLite and Postgres:
the collect job labels every feature with the built-in rules, the labels are searchable through the full-text
index, a relabel replaces instead of duplicating, and a new collection clears stale labels."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureLabel, Run
from app.labels import CATEGORIES, SUBCATEGORIES
from app.labels.builtin import Label
from app.labels.store import label_match, search_terms, write_labels
from app.settings import Settings
from app.web.data.features import FeatureQuery, feature_list
from tests.organism_fixtures import collect_tiny_run
from worker.loop import run_inline

HANDLERS = ["worker.collect.job", "worker.labels"]


@pytest.fixture
def collected(db_url: str, tiny_run_settings: Settings) -> tuple[Settings, int]:
    """The tiny trained run copied into ``db_url``'s store and collected there (which labels it)."""
    return collect_tiny_run(db_url, tiny_run_settings, HANDLERS)


def test_collect_labels_every_feature_and_labels_are_searchable(collected):
    from app.db.session import make_engine

    settings, run_id = collected
    engine = make_engine(settings)
    try:
        with Session(engine) as s:
            n_features = s.scalar(select(func.count()).select_from(Feature).where(Feature.run_id == run_id))
            rows = s.scalars(select(FeatureLabel).where(FeatureLabel.run_id == run_id)).all()
            assert n_features > 0 and len(rows) == n_features
            assert {r.source for r in rows} == {"builtin"}
            for r in rows:
                assert r.label and r.category in CATEGORIES and r.subcategory in SUBCATEGORIES[r.category]
                assert r.score is not None and 0.0 <= r.score <= 1.0
                feat = s.get(Feature, (run_id, r.layer, r.index))
                assert (feat.label, feat.category) == (r.label, r.category)  # the shown label is this one
                assert (r.subcategory == "dead") == (feat.frequency == 0)
            assert any(r.category != "uninterpretable" for r in rows)

            # search: a word of one label finds that feature, and every hit holds every word
            alive = [r for r in rows if r.subcategory != "dead"]
            target = max(alive, key=lambda r: len(search_terms(r.label)))
            words = search_terms(target.label)[:2]
            query = " ".join(words)
            page = feature_list(s, run_id, FeatureQuery(q=query, limit=500))
            hits = {(r.layer, r.index) for r in page.rows}
            assert (target.layer, target.index) in hits
            for r in page.rows:
                assert all(w.lower() in r.label.lower() for w in words), (query, r.label)
            # a prefix matches; a word in no label matches nothing; query syntax is only text
            assert (target.layer, target.index) in {(r.layer, r.index) for r in feature_list(
                s, run_id, FeatureQuery(q=words[0][:3], limit=500)).rows} or len(words[0]) < 3
            assert feature_list(s, run_id, FeatureQuery(q="zzzqqqxxx")).rows == []
            for hostile in ('"', "wait AND (", "NEAR(a b)", "*", "a:* & !b", "'; drop table x;--", "\u0000"):
                feature_list(s, run_id, FeatureQuery(q=hostile))
    finally:
        engine.dispose()


def test_relabel_replaces_and_recollect_clears(collected):
    from app.db.session import make_engine

    settings, run_id = collected
    engine = make_engine(settings)
    try:
        with Session(engine) as s:
            before = s.scalar(select(func.count()).select_from(FeatureLabel).where(FeatureLabel.run_id == run_id))
            f = s.scalars(select(Feature).where(Feature.run_id == run_id).limit(1)).one()
            key = (f.layer, f.index)
        out = run_inline(settings, "label", {"run_id": run_id}, show_progress=False, handler_modules=HANDLERS)
        assert out["labelled"] == before
        with Session(engine) as s, s.begin():
            assert s.scalar(select(func.count()).select_from(FeatureLabel)
                            .where(FeatureLabel.run_id == run_id)) == before
            write_labels(s, run_id, "judge-x", [(*key, Label("talks about zebras", "domain", "science", 0.9))])
        with Session(engine) as s:
            assert s.get(Feature, (run_id, *key)).label == "talks about zebras"
            sub = label_match(s.bind.dialect.name, run_id, "zebra")
            assert s.execute(select(sub.c.layer, sub.c.index)).all() == [key]
        # the FTS index follows updates and deletes (SQLite triggers / Postgres expression index)
        with Session(engine) as s, s.begin():
            s.execute(text("UPDATE feature_labels SET label = 'about giraffes' WHERE source = 'judge-x'"))
        with Session(engine) as s:
            dialect = s.bind.dialect.name
            assert s.execute(select(label_match(dialect, run_id, "zebras"))).all() == []
            assert len(s.execute(select(label_match(dialect, run_id, "giraffe"))).all()) == 1
        run_inline(settings, "collect", {"run_id": run_id, "n_prompts": 24, "max_new_tokens": 24, "top_k": 5,
                                         "n_random": 2}, show_progress=False, handler_modules=HANDLERS)
        with Session(engine) as s:
            sources = set(s.scalars(select(FeatureLabel.source).where(FeatureLabel.run_id == run_id)))
            assert sources == {"builtin"}  # the judge's label described the old examples
            assert s.execute(select(label_match(s.bind.dialect.name, run_id, "giraffe"))).all() == []
        with Session(engine) as s, s.begin():
            s.delete(s.get(Run, run_id))  # cascade: labels go with the run, and out of the search index
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(FeatureLabel)) == 0
            if s.bind.dialect.name == "sqlite":
                assert s.scalar(text("SELECT count(*) FROM feature_labels_fts WHERE feature_labels_fts MATCH 'fires'")) == 0
    finally:
        engine.dispose()


def test_label_search_uses_the_full_text_index(db_engine) -> None:
    """With labels in the store (5,000, few matching), the match is answered by the FTS5 table (SQLite) or the GIN
    index on to_tsvector('simple', label) (Postgres: the query's expression must be the index's to be used)."""
    dialect = db_engine.dialect.name
    with Session(db_engine) as s, s.begin():
        run = Run(name="fts", base_model="b", target_model="t", config={})
        s.add(run)
        s.flush()
        rid = run.id
        write_labels(s, rid, "builtin", [(i // 1000, i % 1000, Label(
            "promotes ' Wait' after a stated answer" if i % 500 == 0 else f"fires on digit {i % 7} in thinking",
            "domain", "math", 1.0)) for i in range(5000)], set_current=False)
    with db_engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        sub = label_match(dialect, rid, "wait answer")
        assert len(conn.execute(select(sub.c.layer, sub.c.index)).all()) == 10
        compiled = select(sub.c.layer, sub.c.index).compile(conn)
        plan = "\n".join(str(r[-1]) for r in conn.exec_driver_sql(
            f"EXPLAIN {'QUERY PLAN ' if dialect == 'sqlite' else ''}{compiled}",
            compiled.params if dialect == "postgresql" else tuple(compiled.params[k] for k in compiled.positiontup)))
    if dialect == "sqlite":
        assert "feature_labels_fts VIRTUAL TABLE INDEX" in plan, plan
    else:
        assert "ix_feature_labels_fts" in plan, plan


def _every_page(session: Session, run_id: int, search: dict, limit: int) -> list[tuple]:
    """(layer, index, strength) of every row of a feature listing, page by page along its ``next`` cursor."""
    after, rows = None, []
    for _ in range(100):
        page = feature_list(session, run_id, FeatureQuery(**search, after=after, limit=limit))
        rows += [(r.layer, r.index, r.strength) for r in page.rows]
        if page.next is None:
            return rows
        after = page.next
    raise AssertionError(f"more than 100 pages for {search}")


def test_a_label_search_lists_the_same_features_walking_or_joining(db_engine, monkeypatch) -> None:
    """A label search walks the listing testing each row (at most WALK_ROWS rows), else joins the grouped matches
    (app/web/data/features.py ``_label_search_rows``): every way lists the same features, in every sort and across
    pages, including a word whose labels all sit at the far end of the order (the walk finds too few: the join)."""
    from app.labels import store
    from app.web.data import features

    monkeypatch.setattr(store, "COMMON_MATCHES", 0)  # SQLite: no search skips the walk for being rare

    with Session(db_engine) as s, s.begin():
        run = Run(name="common", base_model="b", target_model="t", config={}, n_layers=3, n_features=400)
        s.add(run)
        s.flush()
        rid = run.id
        s.add_all([Feature(run_id=rid, layer=i // 400, index=i % 400, frequency=(i * 37 % 101) / 1000,
                           max_act=(i * 53 % 97) / 10, mean_act=0.1) for i in range(1200)])
        s.flush()
        write_labels(s, rid, "builtin", [(i // 400, i % 400, Label(
            f"fires on digit {i % 7}" + (" after a stated answer" if i % 3 else ""), "domain", "math", 1.0))
            for i in range(1200)])
        write_labels(s, rid, "llm", [(i // 400, i % 400, Label("fires on digits", "domain", "math", 1.0))
                                     for i in range(0, 1200, 5)], set_current=False)  # a second labeler
        write_labels(s, rid, "dead", [(i // 400, i % 400, Label("dead", "uninterpretable", "dead", 1.0))
                                      for i in range(1200) if (i * 53 % 97) < 12], set_current=False)  # lowest max_act
    pages = {}
    searches = (("digit answer", "layer"), ("fires", "frequency"), ("digits", "max_act"), ("zebra", "layer"),
                ("dead", "max_act"), ("dead", "layer"))
    for walk in (1, 50, 60, 10**9):  # nearly always the join; walks that fill some pages (60) and none (50: a page
        # needs one row more, to know that a next page exists); always the walk
        monkeypatch.setattr(features, "WALK_ROWS", walk)
        with Session(db_engine) as s:
            pages[walk] = [[row[:2] for row in _every_page(s, rid, dict(q=q, sort=sort), limit=50)]
                           for q, sort in searches]
    assert pages[1] == pages[50] == pages[60] == pages[10**9]
    answer, fires, digits, zebra, dead, dead_by_layer = pages[1]
    assert len(answer) == 800 and len(fires) == 1200 and zebra == []
    assert len(digits) == 240  # only the second labeler wrote "digits" (every 5th feature)
    assert len(dead) == len(dead_by_layer) == sum((i * 53 % 97) < 12 for i in range(1200))
    assert sorted(dead) == sorted(dead_by_layer)
    assert len(set(fires)) == 1200  # two labelers' matches of one feature: listed once


def test_a_label_search_walks_with_every_other_filter_and_stops_at_its_bound(db_engine, tmp_path, monkeypatch) -> None:
    """The walk and the join agree beside the hesitation set (whose keys order a layer sort), token filters (their
    strength sort) and the hesitation sort, page by page; and a walk whose bound holds no page joins instead (a
    walk that went past its bound would find the page itself)."""
    from sqlalchemy import event

    from app.labels import store
    from app.web.data import features
    from tests.seed import seed_world

    world = seed_world(db_engine, tmp_path / "tok")
    rid = world.run_id
    with Session(db_engine) as s, s.begin():
        by_act = [(f.layer, f.index) for f in s.scalars(select(Feature).where(Feature.run_id == rid)
                                                         .order_by(Feature.max_act))]
        write_labels(s, rid, "builtin", [(layer, index, Label("dead" if k < 6 else f"fires on digit {k % 3}",
                                                              "domain", "math", 1.0))
                                         for k, (layer, index) in enumerate(by_act)])
    monkeypatch.setattr(store, "COMMON_MATCHES", 0)  # SQLite: no search skips the walk for being rare
    searches = [dict(q="fires", in_set=True, sort="layer"), dict(q="fires", in_set=True, sort="max_act"),
                dict(q="fires", promotes="Wait"), dict(q="digit", promotes=" the", sort="layer"),
                dict(q="fires", fires_on="5", sort="frequency"), dict(q="fires", sort="hesitation"),
                dict(q="dead", sort="max_act")]
    pages = {}
    for walk in (1, 3, 5, 10**9):
        monkeypatch.setattr(features, "WALK_ROWS", walk)
        with Session(db_engine) as s:
            pages[walk] = [_every_page(s, rid, search, limit=2) for search in searches]
    assert pages[1] == pages[3] == pages[5] == pages[10**9]
    assert all(pages[1]), [s for s, rows in zip(searches, pages[1], strict=True) if not rows]
    assert sorted((layer, index) for layer, index, _ in pages[1][-1]) == sorted(by_act[:6])

    statements: list[str] = []
    event.listen(db_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    monkeypatch.setattr(features, "WALK_ROWS", 5)
    with Session(db_engine) as s:
        feature_list(s, rid, FeatureQuery(q="dead", sort="max_act", limit=2))  # the 5 largest max_act: no "dead"
        joined = sum("label_match" in st for st in statements)
        feature_list(s, rid, FeatureQuery(q="fires", sort="max_act", limit=2))  # a page in the first 5 rows
    assert joined == 1 and sum("label_match" in st for st in statements) == 1
