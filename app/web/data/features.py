"""The feature index: filter, search and sort every feature of a run, paginated by keyset.

Keyset pagination (``after`` = the last row's sort key) keeps each page an index range scan at
millions of features, where OFFSET would read and discard every earlier row. Sorts and the index
each uses: ``layer`` → the primary key (run_id, layer, index); ``frequency`` with a layer filter →
ix_features_run_layer_freq; ``max_act`` → ix_features_run_max_act. Ties are broken by (layer, index),
so the order is total and a cursor is unambiguous.

Token search is two filters on the ``feature_tokens`` table the collect job fills: ``promotes`` (the token
is in the feature's logit-lens top 10) and ``fires_on`` (the token is where one of its top examples fires).
A query names a token (``Wait`` matches every variant: `` Wait``, ``Wait,`` …; ``#123`` is an id); the
run's vocabulary turns it into ids, and the table gives the features, with a strength (the lens value, or
the activation on that token) that the ``strength`` sort orders by, strongest first.

Label search (``q``) is full text over every labeler's labels of the run (app/labels/store.py ``label_filter``:
FTS5 on SQLite, a GIN tsvector index on Postgres): a word in many labels is tested row by row while the listing
walks its own order (at most ``WALK_ROWS`` rows), else the matches are joined like a token filter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from sqlalchemy import Float, and_, cast, false, func, null, or_, select
from sqlalchemy.orm import Session

from app.db.schema import Feature, FeatureSetMember, FeatureToken
from app.db.skipscan import distinct_in_run
from app.labels.store import WALK_ROWS, label_filter
from app.web.data.common import BadInput, RunRef, get_run, hesitation_set, run_ref, run_vocab
from app.web.data.feature import top_token

Sort = Literal["layer", "frequency", "max_act", "strength", "hesitation"]
MAX_QUERY_IDS = 50  # token ids a search may expand to (variants of one word)
TOKEN_FILTERS = ("promotes", "fires_on")


# What an empty form field sends; read as "no filter" (declared, so the OpenAPI document says it is accepted).
Blank = Annotated[str, Field(pattern=r"^\s{0,100}$", description="blank: no filter")]


class FeatureQuery(BaseModel):
    """The shareable state of the feature index (all of it lives in the URL)."""

    layer: int | Blank | None = Field(None, ge=0, le=100_000, description="Only this layer.")
    category: str | None = Field(None, max_length=100, description="Only this category.")
    freq_min: float | Blank | None = Field(None, ge=0, le=1, description="Minimum activation frequency (0–1).")
    freq_max: float | Blank | None = Field(None, ge=0, le=1, description="Maximum activation frequency (0–1).")
    in_set: bool = Field(False, description="Only members of the run's hesitation feature set.")
    promotes: str | None = Field(None, max_length=100, description="A token in the feature's logit-lens top 10 "
                                 "(e.g. Wait: every variant; #123: one id).")
    fires_on: str | None = Field(None, max_length=100, description="A token where the feature's top examples fire.")
    q: str | None = Field(None, max_length=200, description="Words of the feature's label (any labeler's), each "
                          "a word prefix, all required: full-text search (e.g. wait answer).")
    sort: Sort | None = Field(None, description="layer (ascending), frequency / max_act (descending), strength "
                              "(with a token filter: strongest first; its default), or hesitation (the hesitation "
                              "lens: how directly it promotes the hesitation tokens, descending; features without "
                              "one are left out).")
    after: str | None = Field(None, max_length=100, description="Keyset cursor: the previous page's next.")
    limit: int = Field(50, ge=1, le=500)

    @field_validator("category", "promotes", "fires_on", "q", "after", "layer", "freq_min", "freq_max", "sort",
                     mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() and len(v) <= 100 else v

    @model_validator(mode="after")
    def _range(self) -> FeatureQuery:
        if self.freq_min is not None and self.freq_max is not None and self.freq_min > self.freq_max:
            raise ValueError(f"freq_min ({self.freq_min}) is greater than freq_max ({self.freq_max})")
        if self.sort == "strength" and not self.token_filter:
            raise ValueError("sort=strength orders by a token filter's strength: give promotes or fires_on")
        return self

    @property
    def token_filter(self) -> str | None:
        """The token filter that orders ``strength``: promotes first, else fires_on."""
        return "promotes" if self.promotes else "fires_on" if self.fires_on else None

    @property
    def effective_sort(self) -> Sort:
        return self.sort or ("strength" if self.token_filter else "layer")

    def params(self, **changes: Any) -> dict[str, Any]:
        """URL parameters for this query with ``changes`` applied (defaults and blanks left out)."""
        data = self.model_dump() | changes
        defaults = FeatureQuery().model_dump()
        return {k: v for k, v in data.items() if v is not None and v != defaults.get(k) and v != ""}


class FeatureRow(BaseModel):
    layer: int
    index: int
    frequency: float
    max_act: float
    category: str | None
    label: str | None
    role: str | None = Field(None, description="Role in the hesitation set (output, template …), if a member.")
    in_set: bool = False
    top_token: str | None = Field(None, description="Top logit-lens token.")
    strength: float | None = Field(None, description="With a token filter: the lens value or the activation.")
    hesitation_lens: float | None = Field(None, description="Largest logit-lens value among the hesitation tokens.")


class FeatureListPage(BaseModel):
    run: RunRef
    query: FeatureQuery
    sort: Sort = Field(description="The sort in effect.")
    rows: list[FeatureRow]
    next: str | None = Field(None, description="Cursor for the next page (pass as after=).")
    layers: list[int]
    categories: list[str]
    hesitation_set: str | None
    search_ids: dict[str, list[int]] = Field({}, description="Token ids each token filter expanded to.")
    total: int | None = Field(None, description="Features in the run (unfiltered).")


def _cursor_values(sort: Sort, after: str) -> tuple[float | None, int, int]:
    parts = after.split(":")
    try:
        if sort == "layer":
            if len(parts) != 2:
                raise ValueError
            return None, _int32(parts[0]), _int32(parts[1])
        if len(parts) != 3:
            raise ValueError
        value = float(parts[0])
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        return value, _int32(parts[1]), _int32(parts[2])
    except ValueError:
        raise BadInput(f"after={after[:40]!r} is not a cursor for sort={sort!r}; follow the 'next' link instead") from None


def _int32(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**31:
        raise ValueError
    return value


def _cursor(sort: Sort, row: FeatureRow) -> str:
    if sort == "layer":
        return f"{row.layer}:{row.index}"
    value = {"frequency": row.frequency, "max_act": row.max_act, "strength": row.strength,
             "hesitation": row.hesitation_lens}[sort]
    return f"{value!r}:{row.layer}:{row.index}"


def _token_matches(session: Session, run_id: int, relation: str, ids: list[int]) -> Any:
    """(layer, index, strength) of the features related to any of ``ids``: one subquery per filter."""
    ft = FeatureToken.__table__
    return (
        select(ft.c.layer, ft.c.index, func.max(ft.c.value).label("strength"))
        .where(ft.c.run_id == run_id, ft.c.relation == relation, ft.c.token_id.in_(ids or [-1]))
        .group_by(ft.c.layer, ft.c.index)
        .subquery(relation)
    )


MAX_CATEGORIES = 100  # distinct categories offered in the filter


def distinct_categories(session: Session, run_id: int) -> list[str]:
    """The run's categories by a loose index scan: one seek per category on (run_id, category).

    ``SELECT DISTINCT`` reads every feature's index entry (seconds under load at 229k features on
    Postgres, which has no skip scan); this recursive query reads one entry per distinct value.
    """
    return distinct_in_run(session, "features", "category", run_id, MAX_CATEGORIES)


def feature_list(session: Session, run_key: str | int, query: FeatureQuery) -> FeatureListPage:
    run = get_run(session, run_key)
    hset = hesitation_set(session, run.id)
    sort = query.effective_sort
    cond: list[Any] = [Feature.run_id == run.id]
    if query.layer is not None:
        cond.append(Feature.layer == query.layer)
    if query.category is not None:
        cond.append(Feature.category == query.category)
    if query.freq_min is not None:
        cond.append(Feature.frequency >= query.freq_min)
    if query.freq_max is not None:
        cond.append(Feature.frequency <= query.freq_max)
    if query.in_set and hset is None:
        cond.append(false())
    search_ids: dict[str, list[int]] = {}
    matches: dict[str, Any] = {}
    vocab = run_vocab(session, run)
    for relation in TOKEN_FILTERS:
        q = getattr(query, relation)
        if q is not None:
            search_ids[relation] = vocab.ids_matching(q, MAX_QUERY_IDS)
            matches[relation] = _token_matches(session, run.id, relation, search_ids[relation])

    # Keyset conditions are written so that their first conjunct is a plain index range (both SQLite
    # and Postgres plan it as one); the rest breaks ties exactly. Row-value comparisons read better but
    # SQLite does not use them as an index range here.
    # Membership in the hesitation set: an inner join when filtering by it (the members' primary key
    # (set_id, layer, index) then drives the scan, so keys are read off it), else an outer join for roles.
    member = FeatureSetMember.__table__.alias("m")
    on = and_(member.c.set_id == (hset.id if hset else -1), member.c.layer == Feature.layer,
              member.c.index == Feature.index)
    layer_col, index_col = (member.c.layer, member.c.index) if query.in_set else (Feature.layer, Feature.index)
    strength = matches[query.token_filter].c.strength if query.token_filter else None
    if sort == "layer":
        keys = [layer_col, index_col]
        order = keys
        if query.after:
            _, layer, index = _cursor_values("layer", query.after)
            cond.append(and_(layer_col >= layer, or_(layer_col > layer, index_col > index)))
    else:
        col = {"frequency": Feature.frequency, "max_act": Feature.max_act, "strength": strength,
               "hesitation": Feature.hesitation_lens}[sort]
        if sort == "hesitation":  # NULLs sort first on Postgres and last on SQLite: leave them out on both
            cond.append(Feature.hesitation_lens.is_not(None))
        keys = [col, Feature.layer, Feature.index]
        order = [key.desc() for key in keys]
        if query.after:
            value, layer, index = _cursor_values(sort, query.after)
            v = cast(value, Float)
            cond.append(and_(col <= v, or_(col < v, Feature.layer < layer,
                                           and_(Feature.layer == layer, Feature.index < index))))

    def listing(*columns: Any, label_join: Any = None) -> Any:
        stmt = select(*columns).select_from(Feature)  # also where the columns are the members' (in_set's keys)
        for sub in [*matches.values(), *([label_join] if label_join is not None else [])]:
            stmt = stmt.join(sub, and_(sub.c.layer == Feature.layer, sub.c.index == Feature.index))
        return stmt.join(member, on, isouter=not query.in_set).where(*cond).order_by(*order)

    columns = (Feature.layer, Feature.index, Feature.frequency, Feature.max_act, Feature.category, Feature.label,
               Feature.logit_lens, Feature.hesitation_lens, member.c.set_id.label("member_of"), member.c.role,
               (strength if strength is not None else null()).label("strength"))
    if query.q is None:
        raw = session.execute(listing(*columns).limit(query.limit + 1)).all()
    else:
        raw = _label_search_rows(session, run.id, query, sort, listing, columns, keys)
    more = len(raw) > query.limit
    raw = raw[: query.limit]
    rows = []
    for r in raw:
        rows.append(FeatureRow(
            layer=r.layer, index=r.index, frequency=r.frequency, max_act=r.max_act, category=r.category,
            label=r.label, role=r.role, in_set=r.member_of is not None,
            top_token=top_token(r.logit_lens, vocab), strength=r.strength, hesitation_lens=r.hesitation_lens,
        ))
    layers = list(range(run.n_layers)) if run.n_layers else [
        x for (x,) in session.execute(select(Feature.layer).where(Feature.run_id == run.id).distinct().order_by(Feature.layer))
    ]
    categories = distinct_categories(session, run.id)
    return FeatureListPage(
        run=run_ref(run), query=query, sort=sort, rows=rows, next=_cursor(sort, rows[-1]) if more and rows else None,
        layers=layers, categories=categories, hesitation_set=hset.name if hset else None, search_ids=search_ids,
        total=run.n_features * run.n_layers if run.n_features and run.n_layers else None,
    )


def _label_search_rows(session: Session, run_id: int, query: FeatureQuery, sort: Sort,
                       listing: Callable[..., Any], columns: tuple, keys: list[Any]) -> list[Any]:
    """The page's rows (``limit + 1``) under a label search, the cheaper of two exact ways (``LabelFilter``).

    First the walk: the listing in its own order, each row tested for a matching label, over at most
    ``WALK_ROWS`` rows (those up to the ``WALK_ROWS``-th row's sort key, read by the listing's own query without the
    search: an index range where no other filter applies). When those
    rows hold a page, it is the page: every row before it was tested. Otherwise (a word in few labels, or its
    labels far down this order) the grouped matches drive the listing instead.
    """
    found = label_filter(session, run_id, query.q or "", Feature)
    if found.condition is None:  # few matches: they drive the listing at once
        return session.execute(listing(*columns, label_join=found.join).limit(query.limit + 1)).all()
    edge = session.execute(listing(*keys).offset(WALK_ROWS - 1).limit(1)).first()
    walk = listing(*columns).where(found.condition)
    if edge is not None:  # only the rows up to that one, in this order
        if sort == "layer":
            (layer_col, index_col), (layer, index) = keys, edge
            walk = walk.where(and_(layer_col <= layer, or_(layer_col < layer, index_col <= index)))
        else:
            col, value, layer, index = keys[0], edge[0], edge[1], edge[2]
            walk = walk.where(and_(col >= value, or_(col > value, Feature.layer > layer,
                                                     and_(Feature.layer == layer, Feature.index >= index))))
    raw = session.execute(walk.limit(query.limit + 1)).all()
    if len(raw) > query.limit or edge is None:
        return raw
    return session.execute(listing(*columns, label_join=found.join).limit(query.limit + 1)).all()


CSV_PAGE = 500  # features per query while streaming a CSV export
CSV_COLUMNS = ("layer", "index", "frequency", "max_act", "strength", "category", "label", "role", "top_token",
               "hesitation_lens")


def features_csv_lines(make_session: Callable[[], Session], run_key: str | int, query: FeatureQuery,
                       first: FeatureListPage) -> Iterator[str]:
    """CSV text of every feature the query matches, page by page along the keyset (``first`` = page one).

    Streams after the request's own session has closed, so it reads through a session of its own.
    """
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    page = first
    while True:
        for r in page.rows:
            writer.writerow([r.layer, r.index, r.frequency, r.max_act, "" if r.strength is None else r.strength,
                             r.category or "", r.label or "", r.role or "", r.top_token or "",
                             "" if r.hesitation_lens is None else r.hesitation_lens])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
        if not page.next:
            return
        with make_session() as session:
            page = feature_list(session, run_key, query.model_copy(update={"after": page.next, "limit": CSV_PAGE}))
