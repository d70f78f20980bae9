"""The feature index and feature page stay index lookups at any size (SQLite's plans, checked on a seeded db).

A full scan or a sort of the run is invisible at test size and seconds at the paper's 229,376 features,
so the plans themselves are the test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app.db.session import make_engine, make_sessionmaker
from app.web.data.common import DATA_DIR_KEY
from app.web.data.feature import feature_page
from app.web.data.features import FeatureQuery, feature_list
from tests.seed import seed_world


@pytest.fixture
def engine(sqlite_db_url: str, tmp_path) -> Iterator[Engine]:
    eng = make_engine(sqlite_db_url)
    seed_world(eng, tmp_path / "tok")
    with eng.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    yield eng
    eng.dispose()


def plans(engine: Engine, build) -> list[tuple[str, list[str]]]:
    """Run ``build(session)`` and return each SELECT it issued with its query plan lines."""
    seen: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with make_sessionmaker(engine)() as session:
            session.info[DATA_DIR_KEY] = None
            build(session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    out = []
    with engine.connect() as conn:
        for statement, params in seen:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
            out.append((statement, [r[-1] for r in rows]))
    return out


def assert_no_scan_of_features(found: list[tuple[str, list[str]]]) -> None:
    for statement, lines in found:
        if "FROM features" in statement:
            bad = [ln for ln in lines if ln.startswith("SCAN features") or "TEMP B-TREE FOR ORDER BY" in ln]
            assert not bad, f"{statement}\n{lines}"


@pytest.mark.parametrize("query", [
    FeatureQuery(), FeatureQuery(after="1:7"), FeatureQuery(sort="frequency"),
    FeatureQuery(sort="frequency", after="0.01:1:2"), FeatureQuery(sort="max_act", after="5.0:2:3"),
    FeatureQuery(layer=2, sort="frequency"), FeatureQuery(in_set=True), FeatureQuery(in_set=True, after="1:3"),
    FeatureQuery(sort="hesitation"), FeatureQuery(sort="hesitation", after="0.5:1:2"),
], ids=lambda q: str(q.params()))
def test_feature_index_pages_are_index_scans(engine, query):
    assert_no_scan_of_features(plans(engine, lambda s: feature_list(s, 2, query)))


def test_feature_page_queries_are_lookups(engine):
    found = plans(engine, lambda s: feature_page(s, 2, 1, 3))
    assert_no_scan_of_features(found)
    for statement, lines in found:
        if "FROM examples" in statement:
            assert any("ix_examples_feature" in ln for ln in lines), lines


@pytest.mark.parametrize("query", [
    FeatureQuery(promotes="#5"), FeatureQuery(fires_on="#5"), FeatureQuery(promotes="#5", sort="strength"),
    FeatureQuery(promotes="#5", fires_on="#6", after="1.0:1:2"), FeatureQuery(fires_on="#5", in_set=True),
], ids=lambda q: str(q.params()))
def test_token_search_reads_the_token_table_by_its_key(engine, query):
    """promotes / fires_on: the feature_tokens primary key (run, relation, token) finds the matches; each match's
    feature is a primary-key lookup. Only the matches are sorted, never the run."""
    found = plans(engine, lambda s: feature_list(s, 2, query))
    searched = [(st, lines) for st, lines in found if "FROM feature_tokens" in st]
    assert searched, "the token filter issued no query on feature_tokens"
    for _statement, lines in searched:
        assert not any(ln.startswith("SCAN feature_tokens") for ln in lines), lines
        assert any(ln.startswith("SEARCH feature_tokens USING") and "token_id=?" in ln for ln in lines), lines
        assert not any(ln.startswith("SCAN features") for ln in lines), lines
