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

from app.db.attribute_request import AttributeRequestError, submit_attribute
from app.db.lens_request import token_key
from app.db.schema import COLLECTION_SOURCE, Graph, Job, LensResult, Prompt
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
    graph_id: int | None = Field(None, description="A hesitation token: the stored attribution graph explaining "
                                 "it from the tokens before (same ids), if any.")


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
    n_firing: int | None = Field(None, description="With a feature: the tokens where it is active (> 0).")
    feature_in_run: bool = Field(False, description="The feature is one of the run's (a lens may watch it).")


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
                           .where(Prompt.run_id == run.id)
                           # the study's and requested traces before the (many) sequences collect stored
                           .order_by(Prompt.source == COLLECTION_SOURCE, Prompt.id.desc()).limit(MAX_LISTED))
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
    vocab = run_vocab(session, run)
    marks = vocab.hesitation_marks(ids, hesitation_words(run))
    regions = _regions(row.regions, len(ids))
    tokens = []
    for i, tid in enumerate(ids):  # as token_views, without an intermediate model per token (long traces)
        t = vocab.token(tid)
        tokens.append(TraceToken(pos=i, id=tid, text=t.text, kind=t.kind, hesitation=marks[i], region=regions[i]))
    lens_id = session.scalar(select(LensResult.id).where(LensResult.run_id == run.id,
                                                         LensResult.token_key == token_key(ids),
                                                         LensResult.status == "done")
                             .order_by(LensResult.id.desc()).limit(1)) if ids else None
    page = TracePage(run=run_ref(run), trace=TraceInfo(id=row.id, source=row.source, n_tokens=len(ids),
                                                       answer=row.answer),
                     tokens=tokens, n_hesitations=sum(t.hesitation for t in tokens),
                     lens_id=lens_id, shade=shade, feature=fl,
                     feature_in_run=fl is not None and run.has_feature(*fl))
    for pos, gid in why_graphs(session, run.id, ids, [t.pos for t in tokens if t.hesitation]).items():
        tokens[pos].graph_id = gid
    if lens_id is None or shade == "none":
        return page

    def part(*path: str) -> Any:  # one part of the stored result, extracted by the database (a long trace's
        # result holds every position's strongest features: tens of MB of JSON the page does not need)
        return session.scalar(select(LensResult.result[path if len(path) > 1 else path[0]])
                              .where(LensResult.id == lens_id))

    if shade == "feature":
        watched = part("watched", f"{fl[0]}/{fl[1]}")
        page.feature_source = "watched" if watched is not None else "lens"
        values = watched if watched is not None else [
            next((a for ln, ix, a in zip(*cols[:3], strict=True) if (ln, ix) == fl), 0.0)
            for cols in part("features") or []]
    else:
        values = part("kl_hybrid" if shade == "kl-hybrid" else "kl_adapted")
    if not isinstance(values, list) or not values:
        return page
    for t, v in zip(tokens, values, strict=False):
        t.value = float(v)
    page.shade_max = max([float(v) for v in values] + [1e-9])
    if shade == "feature":
        page.n_firing = sum(1 for t in tokens if t.value is not None and t.value > 0)
    return page


# -- "why here?": the attribution graph of one token of a trace ----------------------------------------------


def why_graphs(session: Session, run_id: int, ids: list[int], positions: list[int]) -> dict[int, int]:
    """Position → the newest stored graph explaining ``ids[pos]`` from ``ids[:pos]`` (the study's graphs and
    requested ones alike: the graph's logit position is ``pos - 1`` and its prompt ids are the prefix)."""
    want = {p: ids[p] for p in positions if 1 <= p < len(ids)}
    if not want:
        return {}
    out: dict[int, int] = {}
    rows = session.execute(select(Graph.id, Graph.position, Graph.target_token_id, Graph.params, Graph.prompt_id)
                           .where(Graph.run_id == run_id, Graph.position.in_([p - 1 for p in want]),
                                  Graph.target_token_id.in_(set(want.values())))
                           .order_by(Graph.id)).all()
    # a graph without its prompt ids in params (an import) is matched by its stored prompt's ids
    by_prompt = {pid for *_, params, pid in rows if pid is not None
                 and not isinstance((params or {}).get("prompt_token_ids"), list)}
    prompts = {pid: [int(t) for t in tids or []] for pid, tids in session.execute(
        select(Prompt.id, Prompt.token_ids).where(Prompt.run_id == run_id, Prompt.id.in_(by_prompt)))} if by_prompt else {}
    for gid, gpos, target, params, pid in rows:
        pos = int(gpos) + 1
        prompt_ids = (params or {}).get("prompt_token_ids")
        if not isinstance(prompt_ids, list):
            prompt_ids = prompts.get(pid)
        if want.get(pos) == target and prompt_ids == ids[:pos]:
            out[pos] = int(gid)
    return out


class WhyPage(BaseModel):
    run: RunRef
    trace: TraceInfo
    pos: int
    token: TraceToken
    context: list[TraceToken] = Field(description="The tokens before it (the last few), as the graph sees them.")
    graph_id: int | None = None
    job_id: int | None = Field(None, description="A queued or running attribute job for this token, if any.")
    job_status: str | None = None


def _why_payload(run_id: int, ids: list[int], pos: int) -> dict[str, Any]:
    return {"run_id": run_id, "token_ids": ids[:pos], "target_token": ids[pos]}


def _trace_row(session: Session, run_key: str | int, trace_id: int) -> tuple[Any, Prompt, list[int]]:
    run = get_run(session, run_key)
    row = session.get(Prompt, trace_id)
    if row is None or row.run_id != run.id:
        raise NotFound(f"No trace {trace_id} in run {run.id}.")
    return run, row, [int(t) for t in row.token_ids or []]


def _check_pos(ids: list[int], pos: int) -> None:
    if not 1 <= pos < len(ids):
        raise NotFound(f"No token {pos} to explain in this trace (it has {len(ids)}; the first has no context).")


def why_page(session: Session, run_key: str | int, trace_id: int, pos: int) -> WhyPage:
    """What the "why here?" link of token ``pos`` shows: its graph if stored, else a queued job or a queue form."""
    run, row, ids = _trace_row(session, run_key, trace_id)
    _check_pos(ids, pos)
    lo = max(0, pos - 40)
    toks = token_views(run_vocab(session, run), ids[lo:pos + 1], None, hesitation_words(run))
    views = [TraceToken(pos=lo + i, id=t.id, text=t.text, kind=t.kind, hesitation=t.hesitation)
             for i, t in enumerate(toks)]
    page = WhyPage(run=run_ref(run), trace=TraceInfo(id=row.id, source=row.source, n_tokens=len(ids),
                                                     answer=row.answer),
                   pos=pos, token=views[-1], context=views[:-1],
                   graph_id=why_graphs(session, run.id, ids, [pos]).get(pos))
    if page.graph_id is None:
        want = _why_payload(run.id, ids, pos)
        for job in session.scalars(select(Job).where(Job.kind == "attribute", Job.run_id == run.id)
                                   .order_by(Job.id.desc()).limit(200)):
            payload = job.payload or {}
            if payload.get("token_ids") == want["token_ids"] and payload.get("target_token") == want["target_token"]:
                page.job_id, page.job_status = job.id, str(job.status)
                break
    return page


def queue_why(session: Session, run_key: str | int, trace_id: int, pos: int) -> int:
    """Queue the attribute job explaining token ``pos`` from the tokens before; the caller commits."""
    run, _, ids = _trace_row(session, run_key, trace_id)
    _check_pos(ids, pos)
    try:
        return submit_attribute(session, _why_payload(run.id, ids, pos))
    except AttributeRequestError as exc:
        raise BadInput(str(exc), exc.status_code) from None
