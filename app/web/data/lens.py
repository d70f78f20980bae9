"""The diff lens pages: the request form and list, and one lens (token strip, position panel, feature table).

The strip shades each token by KL(target‖hybrid) or, toggled, KL(target‖adapted): the divergence of the next-token
distributions *at* that token (what each model predicts after reading it). Both use one colour scale (the larger
of the two maxima), so toggling compares them. A position's panel lists the features active there ranked by
|direct effect| on the target's predicted token (worker/lens/diff.py), and the three models' top tokens.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Feature, Job, LensResult
from app.web.data.ablations import parse_features
from app.web.data.common import (
    REQUEST_DONE,
    BadInput,
    NotFound,
    RunRef,
    get_run,
    hesitation_words,
    keys_condition,
    run_ref,
    run_vocab,
    stored_request,
)
from app.web.data.feature import TextTest, Tok, token_views
from app.web.tokens import Vocab

MODELS = ("target", "hybrid", "adapted")
KlChoice = Literal["hybrid", "adapted"]
TableSort = Literal["act", "effect", "n"]
TABLE_SORTS: dict[str, str] = {"act": "max activation", "effect": "|direct effect|", "n": "tokens active"}


class LensForm(BaseModel):
    """What the lens form posts: free text (or explicit ids), ``raw`` to skip the chat format, watched features."""

    prompt: str = Field("", max_length=100_000)
    token_ids: str | None = Field(None, max_length=1_000_000, description="Explicit token ids, space-separated.")
    raw: bool = Field(False, description="Use the text as it is (no chat format).")
    features: str = Field("", max_length=2_000, description="Watched features, e.g. '1:3 2:40'.")
    back: Literal["lens", "feature", "trace"] = Field("lens", description="Where the form's redirect goes.")
    trace_id: int | None = Field(None, ge=1, le=2**31 - 1, description="With back=trace: the trace page to return to.")

    @field_validator("token_ids", "trace_id", mode="before")
    @classmethod
    def _blank(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v


def request_from_form(run_id: int, form: LensForm) -> dict[str, Any]:
    req: dict[str, Any] = {"run_id": run_id, "chat": not form.raw,
                           "features": [list(f) for f in parse_features(form.features, required=False)]}
    if form.token_ids is not None:
        try:
            req["token_ids"] = [int(t) for t in re.split(r"[\s,]+", form.token_ids.strip()) if t]
        except ValueError:
            raise BadInput("token_ids must be whole numbers separated by spaces", 422) from None
    else:
        req["prompt"] = form.prompt
    return req


def create_lens(session: Session, run_key: str | int, form: LensForm, settings: Any = None) -> int:
    """Validate, store and queue a lens (or find the stored identical one); return its id."""
    from app.db.lens_request import submit_lens
    from app.db.requests import AblationLimits

    run = get_run(session, run_key)
    limits = AblationLimits.from_settings(settings) if settings is not None else AblationLimits()
    request = request_from_form(run.id, form)
    return stored_request(session, lambda: submit_lens(session, request, limits=limits))


# ------------------------------------------------------------------------------------------- pages


class LensItem(BaseModel):
    id: int
    status: str
    text: str
    n_tokens: int | None
    created: datetime | None
    mean_kl_hybrid: float | None = None
    mean_kl_adapted: float | None = None


class LensList(BaseModel):
    run: RunRef
    lenses: list[LensItem]


class TopToken(BaseModel):
    id: int
    text: str
    kind: str = "text"
    p: float


class FeatureAt(BaseModel):
    layer: int
    index: int
    act: float
    effect: float = Field(description="Direct effect on the target's predicted token (logit units, frozen norm).")
    label: str | None = None


class Position(BaseModel):
    pos: int
    token: Tok
    predicted: TopToken | None = Field(None, description="The target's most probable next token here.")
    kl_hybrid: float
    kl_adapted: float
    top: dict[str, list[TopToken]]
    n_active: int = Field(description="Features active here (the list keeps the strongest effects).")
    features: list[FeatureAt]


class TableRow(BaseModel):
    layer: int
    index: int
    max_act: float
    pos: int = Field(description="Where its activation is largest.")
    n: int = Field(description="Tokens where it is active.")
    effect: float = Field(description="Its direct effect of largest magnitude over the text.")
    label: str | None = None


class StripToken(BaseModel):
    pos: int
    id: int
    text: str
    kind: str
    hesitation: bool
    kl_hybrid: float | None
    kl_adapted: float | None


class LensInfo(BaseModel):
    id: int
    status: str
    text: str
    chat: bool
    watched: list[tuple[int, int]]
    n_tokens: int | None
    created: datetime | None
    finished: datetime | None
    summary: dict[str, Any] | None
    error: str | None
    job_id: int | None
    job_status: str | None = None


class LensPage(BaseModel):
    run: RunRef
    lens: LensInfo
    done: bool = Field(description="False while the worker has not finished (the page keeps polling).")
    kl: KlChoice = Field(description="Which KL the strip shades by.")
    kl_scale: float | None = Field(description="KL at full colour (the larger of both maxima).")
    tokens: list[StripToken]
    selected: Position | None = Field(description="The clicked position (``pos``), else the largest-KL one.")
    positions: list[Position] = Field([], description="Every position (the JSON API; the page shows `selected`).")
    table: list[TableRow]
    sort: TableSort
    watched: dict[str, list[float]] = Field({}, description="Watched features' activation at every token.")


def _item(row: LensResult) -> LensItem:
    req = row.request or {}
    text = req.get("prompt") if req.get("prompt") is not None else f"{len(req.get('token_ids') or [])} token ids"
    s = row.summary or {}
    return LensItem(id=row.id, status=row.status, text=str(text)[:200], n_tokens=row.n_tokens, created=row.created,
                    mean_kl_hybrid=s.get("mean_kl_hybrid"), mean_kl_adapted=s.get("mean_kl_adapted"))


def lens_list(session: Session, run_key: str | int) -> LensList:
    run = get_run(session, run_key)
    rows = session.scalars(select(LensResult).where(LensResult.run_id == run.id).order_by(LensResult.id.desc())
                           .limit(100))
    return LensList(run=run_ref(run), lenses=[_item(r) for r in rows])


def _lens(session: Session, run_id: int, lens_id: int) -> LensResult:
    row = session.get(LensResult, lens_id)
    if row is None or row.run_id != run_id:
        raise NotFound(f"No lens {lens_id} in run {run_id}.")
    return row


def _top(vocab: Vocab, columns: Any) -> list[TopToken]:
    out = []
    for tid, p in zip(*columns, strict=True):
        t = vocab.token(int(tid))
        out.append(TopToken(id=int(tid), text=t.text, kind=t.kind, p=float(p)))
    return out


def _labels(session: Session, run_id: int, keys: set[tuple[int, int]]) -> dict[tuple[int, int], str | None]:
    if not keys:
        return {}
    rows = session.execute(select(Feature.layer, Feature.index, Feature.label)
                           .where(Feature.run_id == run_id, keys_condition(Feature.layer, Feature.index, keys)))
    return {(r.layer, r.index): r.label for r in rows}


def _position(result: dict[str, Any], pos: int, tok: Tok, vocab: Vocab,
              labels: dict[tuple[int, int], str | None]) -> Position:
    predicted = result["predicted"][pos]
    ids, probs = result["top"]["target"][pos]
    p_pred = next((p for t, p in zip(ids, probs, strict=True) if t == predicted), None)
    pt = vocab.token(int(predicted))
    return Position(
        pos=pos, token=tok, predicted=TopToken(id=predicted, text=pt.text, kind=pt.kind, p=p_pred or 0.0),
        kl_hybrid=result["kl_hybrid"][pos], kl_adapted=result["kl_adapted"][pos],
        top={m: _top(vocab, result["top"][m][pos]) for m in MODELS}, n_active=result["n_active"][pos],
        features=[FeatureAt(layer=a, index=b, act=c, effect=d, label=labels.get((a, b)))
                  for a, b, c, d in zip(*result["features"][pos], strict=True)])


def lens_page(session: Session, run_key: str | int, lens_id: int, *, kl: KlChoice = "hybrid",
              pos: int | None = None, sort: TableSort = "act", all_positions: bool = False) -> LensPage:
    run = get_run(session, run_key)
    row = _lens(session, run.id, lens_id)
    req = row.request or {}
    job = session.get(Job, row.job_id) if row.job_id else None
    job_status = (job.status.value if hasattr(job.status, "value") else str(job.status)) if job else None
    done = row.status in REQUEST_DONE or job_status in REQUEST_DONE
    info = LensInfo(id=row.id, status=row.status,
                    text=req.get("prompt") if req.get("prompt") is not None else "(token ids)",
                    chat=bool(req.get("chat", True)), watched=[tuple(f) for f in req.get("features") or []],
                    n_tokens=row.n_tokens, created=row.created, finished=row.finished, summary=row.summary,
                    error=row.error, job_id=row.job_id, job_status=job_status)
    result = row.result
    if not result:
        return LensPage(run=run_ref(run), lens=info, done=done, kl=kl, kl_scale=None, tokens=[], selected=None,
                        table=[], sort=sort)
    ids = [int(t) for t in result["token_ids"]]
    if pos is not None and not 0 <= pos < len(ids):
        raise BadInput(f"position {pos} is outside the text's {len(ids)} tokens", 422)
    vocab = run_vocab(session, run)
    toks = token_views(vocab, ids, None, hesitation_words(run))
    kh, ka = result["kl_hybrid"], result["kl_adapted"]
    strip = [StripToken(pos=i, id=t.id, text=t.text, kind=t.kind, hesitation=t.hesitation, kl_hybrid=kh[i],
                        kl_adapted=ka[i]) for i, t in enumerate(toks)]
    chosen = kh if kl == "hybrid" else ka
    if pos is None:
        pos = max(range(len(ids)), key=lambda i: chosen[i])
    rows = [TableRow(**r) for r in result.get("table") or []]
    key = {"act": lambda r: (-r.max_act, r.layer, r.index), "effect": lambda r: (-abs(r.effect), r.layer, r.index),
           "n": lambda r: (-r.n, -r.max_act, r.layer, r.index)}[sort]
    rows.sort(key=key)
    wanted = {(r.layer, r.index) for r in rows}
    shown = range(len(ids)) if all_positions else [pos]
    for i in shown:
        wanted |= set(zip(result["features"][i][0], result["features"][i][1], strict=True))
    labels = _labels(session, run.id, wanted)
    for r in rows:
        r.label = labels.get((r.layer, r.index))
    positions = [_position(result, i, toks[i], vocab, labels) for i in shown]
    return LensPage(run=run_ref(run), lens=info, done=done, kl=kl, kl_scale=max(max(kh), max(ka), 1e-9),
                    tokens=strip, selected=positions[0] if not all_positions else positions[pos],
                    positions=positions if all_positions else [], table=rows, sort=sort,
                    watched=result.get("watched") or {})


def lens_position(session: Session, run_key: str | int, lens_id: int, pos: int) -> Position:
    page = lens_page(session, run_key, lens_id, pos=pos)
    if page.selected is None:
        raise NotFound(f"Lens {lens_id} has no result yet.")
    return page.selected


def feature_text_test(session: Session, run_key: str | int, layer: int, index: int, lens_id: int) -> TextTest:
    """Feature (layer, index) on lens ``lens_id``'s text: its watched activation trace when the lens watched it,
    else what the lens kept per position (its strongest features: weak activations may be missing)."""
    page = lens_page(session, run_key, lens_id)
    row = _lens(session, page.run.id, lens_id)
    out = TextTest(lens_id=lens_id, status=row.status, done=page.done, error=row.error)
    result = row.result
    if not result:
        return out
    ids = [int(t) for t in result["token_ids"]]
    acts = (result.get("watched") or {}).get(f"{layer}/{index}")
    out.source = "watched"
    if acts is None:
        out.source = "lens"
        acts = [next((a for ln, ix, a in zip(*feats[:3], strict=True) if ln == layer and ix == index), 0.0)
                for feats in result["features"]]
    run = get_run(session, run_key)
    out.tokens = token_views(run_vocab(session, run), ids, acts, hesitation_words(run))
    if acts and max(acts) > 0:
        out.max_act = float(max(acts))
        out.max_pos = int(max(range(len(acts)), key=lambda i: acts[i]))
    return out
