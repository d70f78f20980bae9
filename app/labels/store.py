"""Labels in the store: writing them, searching them, and the category shares of a run.

``feature_labels`` holds one row per (feature, source); the labeler written last also fills the feature's own
``label`` / ``category`` slots, which the feature index, its CSV, graph nodes and neighbour lists show.

Search (:func:`label_match`) is full text on both backends, through the index migration 0007 made: SQLite's
FTS5 table ``feature_labels_fts``, Postgres's GIN index on ``to_tsvector('simple', label)``. A query is cut into
words (letters, digits, underscore; at most ``MAX_TERMS``), each matched as a word prefix, all required:
``wait answer`` finds "promotes ' Wait' after a stated answer in thinking". No query syntax reaches the engine,
so no input can make it fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, bindparam, delete, func, literal_column, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app.db.schema import LABEL_FTS_TABLE, Feature, FeatureLabel
from app.db.skipscan import distinct_in_run
from app.db.text import storable
from app.labels import CATEGORIES
from app.labels.builtin import Label

MAX_TERMS = 8
MAX_TERM_CHARS = 40
_TERM = re.compile(r"\w+")


def _conn(target: Session | Connection) -> Connection:
    return target.connection() if isinstance(target, Session) else target


def write_labels(target: Session | Connection, run_id: int, source: str,
                 labels: Sequence[tuple[int, int, Label]], *, set_current: bool = True) -> int:
    """Replace ``source``'s labels of these features (one layer or many) and, with ``set_current``, make them the
    features' shown label and category. Runs inside the caller's transaction; returns the rows written."""
    if not labels:
        return 0
    conn = _conn(target)
    fl = FeatureLabel.__table__
    by_layer: dict[int, list[int]] = {}
    for layer, index, _ in labels:
        by_layer.setdefault(layer, []).append(index)
    for layer, indices in by_layer.items():
        for start in range(0, len(indices), 500):
            conn.execute(delete(fl).where(fl.c.run_id == run_id, fl.c.source == source, fl.c.layer == layer,
                                          fl.c.index.in_(indices[start:start + 500])))
    conn.execute(fl.insert(), [
        {"run_id": run_id, "layer": layer, "index": index, "source": source, "label": storable(lab.label[:500]),
         "category": lab.category, "subcategory": lab.subcategory, "score": lab.score,
         "details": _storable(lab.details) or None}
        for layer, index, lab in labels
    ])
    if set_current:
        ft = Feature.__table__
        conn.execute(
            ft.update().where(ft.c.run_id == bindparam("r"), ft.c.layer == bindparam("l"), ft.c.index == bindparam("i"))
            .values(label=bindparam("lab"), category=bindparam("cat")),
            [{"r": run_id, "l": layer, "i": index, "lab": storable(lab.label[:500]), "cat": lab.category}
             for layer, index, lab in labels])
    return len(labels)


def _storable(value: Any) -> Any:
    """JSON with every string made storable on both backends (a byte-0 token decodes to NUL)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def clear_labels(target: Session | Connection, run_id: int, layers: Iterable[int] | None = None) -> None:
    """Remove every source's labels of the run's ``layers`` (all): a new collection makes them stale."""
    fl = FeatureLabel.__table__
    stmt = delete(fl).where(fl.c.run_id == run_id)
    if layers is not None:
        stmt = stmt.where(fl.c.layer.in_(list(layers)))
    _conn(target).execute(stmt)


def labelled_keys(session: Session | Connection, run_id: int, source: str) -> set[tuple[int, int]]:
    """(layer, index) of the features ``source`` has labelled (what a resumed labelling skips)."""
    fl = FeatureLabel.__table__
    rows = _conn(session).execute(select(fl.c.layer, fl.c.index).where(fl.c.run_id == run_id, fl.c.source == source))
    return {(r.layer, r.index) for r in rows}


# -- search ------------------------------------------------------------------------------------------------

def search_terms(query: str) -> list[str]:
    """The words of a label query (see the module docstring)."""
    return [t[:MAX_TERM_CHARS] for t in _TERM.findall(query or "")][:MAX_TERMS]


def _fts_expr(terms: Sequence[str]) -> str:
    """FTS5's query for ``terms``: each a quoted word prefix, all required (no operator reaches FTS5)."""
    return " ".join('"' + t.replace('"', '') + '"*' for t in terms)


# The ids (rowids) of the labels that FTS5 matches with the bound query :fts_q; every SQLite label search uses it.
_FTS_MATCH = f"SELECT rowid FROM {LABEL_FTS_TABLE} WHERE {LABEL_FTS_TABLE} MATCH :fts_q"


def _fts_ids(expr: str) -> Any:
    return text(_FTS_MATCH).bindparams(fts_q=expr).columns(rowid=Integer)


def _label_condition(dialect: str, terms: Sequence[str]) -> Any:
    """The condition on a ``feature_labels`` row that its label matches every one of ``terms``."""
    fl = FeatureLabel.__table__
    if not terms:
        return fl.c.id < 0  # no words: nothing matches
    if dialect == "sqlite":
        return fl.c.id.in_(_fts_ids(_fts_expr(terms)))
    if dialect == "postgresql":
        simple = literal_column("'simple'")
        tsq = " & ".join(f"{t.lower()}:*" for t in terms)
        return func.to_tsvector(simple, fl.c.label).op("@@")(func.to_tsquery(simple, bindparam("ts_q", tsq)))
    cond = func.lower(fl.c.label).contains(terms[0].lower())  # another backend: a plain substring match per word
    for t in terms[1:]:
        cond = cond & func.lower(fl.c.label).contains(t.lower())
    return cond


def label_match(dialect: str, run_id: int, query: str) -> Any:
    """A subquery of (layer, index) of the run's features with a label (of any source) matching ``query``.

    On SQLite the matching label ids come first (FTS5), then their rows by primary key (``CROSS JOIN`` keeps
    that order: SQLite otherwise scanned the run's labels and probed the id list, 17 ms even for no match)."""
    fl = FeatureLabel.__table__
    terms = search_terms(query)
    if terms and dialect == "sqlite":
        return text(f'SELECT fl.layer AS layer, fl."index" AS "index" FROM ({_FTS_MATCH}) AS m '
                    'CROSS JOIN feature_labels AS fl ON fl.id = m.rowid '
                    'WHERE fl.run_id = :fts_run GROUP BY fl.layer, fl."index"'
                    ).bindparams(fts_q=_fts_expr(terms), fts_run=run_id
                                 ).columns(layer=Integer, index=Integer).subquery("label_match")
    return (select(fl.c.layer, fl.c.index).where(fl.c.run_id == run_id, _label_condition(dialect, terms))
            .group_by(fl.c.layer, fl.c.index).subquery("label_match"))


WALK_ROWS = 2000  # rows of a listing that a label search tests one by one before it joins the matches instead
COMMON_MATCHES = 5000  # SQLite: with at most this many matching labels (counted by FTS5), join them at once


@dataclass
class LabelFilter:
    """A label search in a feature listing, two equivalent ways (app/web/data/features.py picks per page):

    - ``condition``: EXISTS a matching label, tested on each listed feature while the listing walks its own
      index in its sort order, stopping at a page. Cheap for a word in many labels ("fires": 172k of 229k at
      the paper's scale), where gathering, grouping and sorting every match took 170 ms (SQLite) to 820 ms
      (Postgres, "stated answer"); but a walk past many non-matching rows is slow, so the listing walks at most
      :data:`WALK_ROWS` rows;
    - ``join``: the grouped matches (:func:`label_match`) drive the listing: cheap for a rare word, and what
      a listing falls back to when the walk found too few matches (benchmarks/labels.py measures both ways).

    ``condition`` is None where the join is known to be the cheaper: on SQLite, FTS5 counts the matches up to
    :data:`COMMON_MATCHES` in a few ms, and a rare word then skips the walk. Postgres's GIN index has no such
    cheap count (a bitmap of every match: 30 ms for "fires"), so there every search walks first.
    """

    join: Any
    condition: Any | None


def label_filter(session: Session, run_id: int, query: str, feature: Any) -> LabelFilter:
    """The label search ``query`` for a listing of ``feature`` rows (a table or ORM class with run_id, layer,
    index)."""
    dialect = session.get_bind().dialect.name
    fl = FeatureLabel.__table__
    terms = search_terms(query)
    join = label_match(dialect, run_id, query)
    if not terms:
        return LabelFilter(join=join, condition=None)
    if dialect == "sqlite":
        n = session.execute(text(f"SELECT count(*) FROM ({_FTS_MATCH} LIMIT :cap)"),
                            {"fts_q": _fts_expr(terms), "cap": COMMON_MATCHES + 1}).scalar_one()
        if n <= COMMON_MATCHES:
            return LabelFilter(join=join, condition=None)
    # OFFSET 0 keeps the EXISTS a test per listed row: Postgres otherwise turns it into a join driven by every
    # match (its estimate for a prefix query is a fixed few thousand rows), 700 ms for "stated answer"
    probe = select(fl.c.id).where(fl.c.run_id == feature.run_id, fl.c.layer == feature.layer,
                                  fl.c.index == feature.index, _label_condition(dialect, terms))
    return LabelFilter(join=join, condition=probe.offset(0).exists())


# -- category shares ---------------------------------------------------------------------------------------

@dataclass
class SourceCount:
    source: str
    newest_id: int


MAX_SOURCES = 50


def label_sources(session: Session, run_id: int) -> list[SourceCount]:
    """The labelers that labelled this run, the one that wrote last first.

    The names come from a loose index scan (one seek per labeler on ``ix_feature_labels_run_source``), so a run
    with 229k labels per labeler costs a few seeks, not a scan; "last" is the highest row id.
    """
    names = distinct_in_run(session, "feature_labels", "source", run_id, MAX_SOURCES)
    fl = FeatureLabel.__table__
    out = []
    for name in names:
        newest = session.scalar(select(fl.c.id).where(fl.c.run_id == run_id, fl.c.source == name)
                                .order_by(fl.c.id.desc()).limit(1))
        out.append(SourceCount(name, newest or 0))
    return sorted(out, key=lambda s: s.newest_id, reverse=True)


def category_counts(session: Session, run_id: int, source: str) -> dict[int, dict[tuple[str, str | None], int]]:
    """{layer: {(category, subcategory): features}} of one labeler's labels."""
    fl = FeatureLabel.__table__
    out: dict[int, dict[tuple[str, str | None], int]] = {}
    for r in session.execute(
        select(fl.c.layer, fl.c.category, fl.c.subcategory, func.count().label("n"))
        .where(fl.c.run_id == run_id, fl.c.source == source).group_by(fl.c.layer, fl.c.category, fl.c.subcategory)
    ):
        out.setdefault(r.layer, {})[(r.category or "uninterpretable", r.subcategory)] = r.n
    return out


def is_alive(category: str, subcategory: str | None) -> bool:
    return not (category == "uninterpretable" and subcategory == "dead")


def ordered_categories(found: Iterable[str]) -> list[str]:
    found = set(found)
    return [c for c in CATEGORIES if c in found] + sorted(found - set(CATEGORIES))
