"""The feature index: filter, search and sort every feature of a run, paginated by keyset.

Keyset pagination (``after`` = the last row's sort key) keeps each page an index range scan at
millions of features, where OFFSET would read and discard every earlier row. Sorts and the index
each uses: ``layer`` → the primary key (run_id, layer, index); ``frequency`` with a layer filter →
ix_features_run_layer_freq; ``max_act`` → ix_features_run_max_act. Ties are broken by (layer, index),
so the order is total and a cursor is unambiguous.

Token search (``q``): the ids whose text is ``q`` (the run's vocabulary) are looked up among each
feature's logit-lens tokens and the focus tokens of its top ``SEARCH_TOP_EXAMPLES`` examples. This
reads JSON row by row in index order and stops at a page of matches: fast for common tokens, a scan
of the run for a token that almost never matches.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from sqlalchemy import Float, Integer, Text, and_, cast, false, func, literal, or_, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from app.db.requests import MAX_INDEX
from app.db.schema import Example, Feature, FeatureSetMember
from app.web.data.common import BadInput, RunRef, get_run, hesitation_set, run_ref, run_vocab
from app.web.data.feature import top_token

Sort = Literal["layer", "frequency", "max_act"]
MAX_QUERY_IDS = 50  # token ids a search may expand to (variants of one word)
SEARCH_TOP_EXAMPLES = 5  # a search looks at the focus token of this many top examples per feature


# What an empty form field sends; read as "no filter" (declared, so the OpenAPI document says it is accepted).
Blank = Annotated[str, Field(pattern=r"^\s{0,100}$", description="blank: no filter")]


class FeatureQuery(BaseModel):
    """The shareable state of the feature index (all of it lives in the URL)."""

    layer: int | Blank | None = Field(None, ge=0, le=10_000, description="Only this layer.")
    category: str | None = Field(None, max_length=100, description="Only this category.")
    freq_min: float | Blank | None = Field(None, ge=0, le=1, description="Minimum activation frequency (0–1).")
    freq_max: float | Blank | None = Field(None, ge=0, le=1, description="Maximum activation frequency (0–1).")
    in_set: bool = Field(False, description="Only members of the run's hesitation feature set.")
    q: str | None = Field(None, max_length=100, description="A token in the logit lens or top examples.")
    sort: Sort = Field("layer", description="layer (ascending) or frequency / max_act (descending).")
    after: str | None = Field(None, max_length=100, description="Keyset cursor: the previous page's next.")
    limit: int = Field(50, ge=1, le=500)

    @field_validator("category", "q", "after", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() and len(v) <= 100 else v

    @field_validator("layer", "freq_min", "freq_max", mode="before")
    @classmethod
    def _blank_number_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _range(self) -> FeatureQuery:
        if self.freq_min is not None and self.freq_max is not None and self.freq_min > self.freq_max:
            raise ValueError(f"freq_min ({self.freq_min}) is greater than freq_max ({self.freq_max})")
        return self

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


class FeatureListPage(BaseModel):
    run: RunRef
    query: FeatureQuery
    rows: list[FeatureRow]
    next: str | None = Field(None, description="Cursor for the next page (pass as after=).")
    layers: list[int]
    categories: list[str]
    hesitation_set: str | None
    search_ids: list[int] | None = Field(None, description="Token ids the search q expanded to.")
    total: int | None = Field(None, description="Features in the run (unfiltered).")


def _cursor_values(sort: Sort, after: str) -> tuple[float | None, int, int]:
    parts = after.split(":")
    try:
        if len(parts) != (2 if sort == "layer" else 3) or not all(p.isascii() and p.isdigit() for p in parts[-2:]):
            raise ValueError
        layer, index = int(parts[-2]), int(parts[-1])
        if max(layer, index) > MAX_INDEX:
            raise ValueError
        return (None if sort == "layer" else float(parts[0])), layer, index
    except ValueError:
        raise BadInput(f"after={after!r} is not a cursor for sort={sort!r}; follow the 'next' link instead") from None


def _cursor(sort: Sort, row: FeatureRow) -> str:
    if sort == "layer":
        return f"{row.layer}:{row.index}"
    value = row.frequency if sort == "frequency" else row.max_act
    return f"{value!r}:{row.layer}:{row.index}"


def _focus_token(session: Session) -> Any:
    """The token id at an example's focus position, as an integer expression on either backend."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(Example.token_ids.op("->>")(Example.focus), Integer)
    return cast(func.json_extract(Example.token_ids, "$[" + cast(Example.focus, Text) + "]"), Integer)


def _search_condition(session: Session, run_id: int, ids: list[int]) -> Any:
    if not ids:
        return false()
    if session.get_bind().dialect.name == "postgresql":
        # JSONB containment: an entry [id, text, value] contains [id]; no text rendering of the document.
        lens = or_(*(Feature.logit_lens.op("@>")(cast({part: [[i]]}, JSONB)) for i in ids for part in ("top", "bottom")))
    else:
        # Entries [id, text, value] print as "[id, ..." and ids are the only numbers that follow a "[".
        lens = or_(*(cast(Feature.logit_lens, Text).like(f"%[{i}, %") for i in ids))
    # A correlated scalar subquery rather than EXISTS: Postgres would hash an EXISTS here, i.e. scan every
    # example of the run before returning the first page; this stays a few index lookups per feature.
    in_examples = (
        select(literal(1)).where(
            Example.run_id == run_id, Example.layer == Feature.layer, Example.index == Feature.index,
            Example.kind == "top", Example.rank < SEARCH_TOP_EXAMPLES, _focus_token(session).in_(ids),
        ).limit(1).scalar_subquery().is_not(None)
    )
    return or_(lens, in_examples)


MAX_CATEGORIES = 100  # distinct categories offered in the filter


def distinct_categories(session: Session, run_id: int) -> list[str]:
    """The run's categories by a loose index scan: one seek per category on (run_id, category).

    ``SELECT DISTINCT`` reads every feature's index entry (seconds under load at 229k features on
    Postgres, which has no skip scan); this recursive query reads one entry per distinct value.
    """
    sql = text(
        "WITH RECURSIVE c(cat, n) AS ("
        " SELECT (SELECT min(category) FROM features WHERE run_id = :run), 1"
        " UNION ALL"
        " SELECT (SELECT min(category) FROM features WHERE run_id = :run AND category > c.cat), n + 1"
        " FROM c WHERE c.cat IS NOT NULL AND n < :most)"
        " SELECT cat FROM c WHERE cat IS NOT NULL"
    )
    return [c for (c,) in session.execute(sql, {"run": run_id, "most": MAX_CATEGORIES})]


def feature_list(session: Session, run_key: str | int, query: FeatureQuery) -> FeatureListPage:
    run = get_run(session, run_key)
    hset = hesitation_set(session, run.id)
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
    search_ids: list[int] | None = None
    if query.q is not None:
        q = query.q
        search_ids = [int(q[1:])] if q.startswith("#") and q[1:].isdigit() else run_vocab(session, run).ids_matching(q, MAX_QUERY_IDS)
        cond.append(_search_condition(session, run.id, search_ids))

    # Keyset conditions are written so that their first conjunct is a plain index range (both SQLite
    # and Postgres plan it as one); the rest breaks ties exactly. Row-value comparisons read better but
    # SQLite does not use them as an index range here.
    # Membership in the hesitation set: an inner join when filtering by it (the members' primary key
    # (set_id, layer, index) then drives the scan, so keys are read off it), else an outer join for roles.
    member = FeatureSetMember.__table__.alias("m")
    on = and_(member.c.set_id == (hset.id if hset else -1), member.c.layer == Feature.layer,
              member.c.index == Feature.index)
    layer_col, index_col = (member.c.layer, member.c.index) if query.in_set else (Feature.layer, Feature.index)
    if query.sort == "layer":
        order = [layer_col, index_col]
        if query.after:
            _, layer, index = _cursor_values("layer", query.after)
            cond.append(and_(layer_col >= layer, or_(layer_col > layer, index_col > index)))
    else:
        col = Feature.frequency if query.sort == "frequency" else Feature.max_act
        order = [col.desc(), Feature.layer.desc(), Feature.index.desc()]
        if query.after:
            value, layer, index = _cursor_values(query.sort, query.after)
            v = cast(value, Float)
            cond.append(and_(col <= v, or_(col < v, Feature.layer < layer,
                                           and_(Feature.layer == layer, Feature.index < index))))

    stmt = (
        select(Feature.layer, Feature.index, Feature.frequency, Feature.max_act, Feature.category, Feature.label,
               Feature.logit_lens, member.c.set_id.label("member_of"), member.c.role)
        .join(member, on, isouter=not query.in_set)
        .where(*cond).order_by(*order).limit(query.limit + 1)
    )
    raw = session.execute(stmt).all()
    more = len(raw) > query.limit
    raw = raw[: query.limit]
    vocab = run_vocab(session, run) if raw else None
    rows = []
    for r in raw:
        rows.append(FeatureRow(
            layer=r.layer, index=r.index, frequency=r.frequency, max_act=r.max_act, category=r.category,
            label=r.label, role=r.role, in_set=r.member_of is not None,
            top_token=top_token(r.logit_lens, vocab),
        ))
    layers = list(range(run.n_layers)) if run.n_layers else [
        x for (x,) in session.execute(select(Feature.layer).where(Feature.run_id == run.id).distinct().order_by(Feature.layer))
    ]
    categories = distinct_categories(session, run.id)
    return FeatureListPage(
        run=run_ref(run), query=query, rows=rows, next=_cursor(query.sort, rows[-1]) if more and rows else None,
        layers=layers, categories=categories, hesitation_set=hset.name if hset else None, search_ids=search_ids,
        total=run.n_features * run.n_layers if run.n_features and run.n_layers else None,
    )
