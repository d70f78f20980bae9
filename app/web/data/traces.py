"""Stored traces (``prompts`` rows) as one long strip: hesitation tokens outlined, chat regions, a minimap, and
shading by the diff lens of the same token ids (KL(target‖hybrid), KL(target‖adapted) or one feature).

The shading comes from a finished lens of this run whose token ids are the trace's (``lens_results.token_key``);
the page offers to run one when there is none. Token ids are the stored ones, never re-tokenized.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.lens_request import token_key
from app.db.schema import LensResult, Prompt
from app.web.data.common import BadInput, NotFound, RunRef, get_run, hesitation_words, run_ref, run_vocab
from app.web.data.feature import token_views

Shade = Literal["none", "kl-hybrid", "kl-adapted", "feature"]
MAX_LISTED = 200  # traces listed per page
_FEATURE_RE = re.compile(r"^\s*[Ll]?(\d{1,6})\s*[:/]\s*(\d{1,9})\s*$")


class TraceToken(BaseModel):
    pos: int
    id: int
    text: str
    kind: str
    hesitation: bool
    region: str | None = None
    value: float | None = Field(None, description="The shading value (a KL in nats or an activation).")


class TraceInfo(BaseModel):
    id: int
    source: str
    n_tokens: int
    answer: str | None


class TracePage(BaseModel):
    run: RunRef
    trace: TraceInfo
    tokens: list[TraceToken]
    n_hesitations: int = Field(description="Tokens that are part of a hesitation word.")
    lens_id: int | None = Field(None, description="The finished lens of these token ids that shades the trace.")
    shade: Shade
    feature: tuple[int, int] | None = None
    shade_max: float | None = Field(None, description="The shading value at full colour.")
    feature_source: str | None = Field(None, description="watched (every token) or lens (its strongest features).")


class TraceItem(BaseModel):
    id: int
    source: str
    n_tokens: int
    text: str


class TraceList(BaseModel):
    run: RunRef
    traces: list[TraceItem]


def parse_feature(text: str | None) -> tuple[int, int] | None:
    if text is None or not text.strip():
        return None
    m = _FEATURE_RE.match(text)
    if m is None:
        raise BadInput(f"Cannot read feature {text[:40]!r}: write it as layer/index, e.g. 3/17", 422)
    return int(m.group(1)), int(m.group(2))


def trace_list(session: Session, run_key: str | int) -> TraceList:
    run = get_run(session, run_key)
    rows = session.execute(select(Prompt.id, Prompt.source, Prompt.text, func.json_array_length(Prompt.token_ids)
                                  if session.bind.dialect.name == "sqlite"
                                  else func.jsonb_array_length(Prompt.token_ids))
                           .where(Prompt.run_id == run.id).order_by(Prompt.id.desc()).limit(MAX_LISTED))
    return TraceList(run=run_ref(run), traces=[TraceItem(id=i, source=src, n_tokens=n or 0, text=(t or "")[:160])
                                               for i, src, t, n in rows])


def _regions(raw: Any, n: int) -> list[str | None]:
    out: list[str | None] = [None] * n
    for item in raw or []:
        if isinstance(item, list | tuple) and len(item) == 3 and all(isinstance(x, int) for x in item[:2]):
            for i in range(max(0, item[0]), min(n, item[1])):
                out[i] = str(item[2])
    return out


def trace_page(session: Session, run_key: str | int, trace_id: int, *, shade: Shade = "kl-hybrid",
               feature: str | None = None) -> TracePage:
    run = get_run(session, run_key)
    row = session.get(Prompt, trace_id)
    if row is None or row.run_id != run.id:
        raise NotFound(f"No trace {trace_id} in run {run.id}.")
    ids = [int(t) for t in row.token_ids or []]
    fl = parse_feature(feature)
    if fl is not None:
        shade = "feature"
    elif shade == "feature":
        raise BadInput("shade=feature needs feature=layer/index", 422)
    toks = token_views(run_vocab(session, run), ids, None, hesitation_words(run))
    regions = _regions(row.regions, len(ids))
    tokens = [TraceToken(pos=i, id=t.id, text=t.text, kind=t.kind, hesitation=t.hesitation, region=regions[i])
              for i, t in enumerate(toks)]
    lens = session.scalars(select(LensResult).where(LensResult.run_id == run.id,
                                                    LensResult.token_key == token_key(ids),
                                                    LensResult.status == "done")
                           .order_by(LensResult.id.desc()).limit(1)).first() if ids else None
    page = TracePage(run=run_ref(run), trace=TraceInfo(id=row.id, source=row.source, n_tokens=len(ids),
                                                       answer=row.answer),
                     tokens=tokens, n_hesitations=sum(t.hesitation for t in tokens),
                     lens_id=lens.id if lens else None, shade=shade, feature=fl)
    result = lens.result if lens is not None else None
    if not result or shade == "none":
        return page
    if shade == "feature":
        watched = (result.get("watched") or {}).get(f"{fl[0]}/{fl[1]}")
        page.feature_source = "watched" if watched is not None else "lens"
        values = watched if watched is not None else [
            next((a for ln, ix, a in zip(*cols[:3], strict=True) if (ln, ix) == fl), 0.0) for cols in result["features"]]
    else:
        values = result["kl_hybrid" if shade == "kl-hybrid" else "kl_adapted"]
    for t, v in zip(tokens, values, strict=False):
        t.value = float(v)
    page.shade_max = max([float(v) for v in values] + [1e-9])
    return page
