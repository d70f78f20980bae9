"""Ablation results (tokens per condition as the worker streams them) and the ablate request itself.

Divergence: the first step where the ablated text differs from the unablated one; every later
token of both is marked. The KL strip is the ablated condition's per-token KL (design.md: KL between
the unablated and the ablated next-token distributions, both given the ablated text so far).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Ablation, AblationToken, Feature, Job
from app.web.data.common import (
    REQUEST_DONE,
    BadInput,
    NotFound,
    RunRef,
    cancel_request,
    get_run,
    hesitation_words,
    keys_condition,
    run_prompt_checker,
    run_ref,
    run_vocab,
    stored_request,
)
from app.web.data.feature import Tok, token_views
from app.web.data.runs import LinkItem, ablation_item
from training.hesitation import hesitation_marks

CONDITION_ORDER = ("unablated", "ablated", "hybrid", "target")
DONE_STATES = REQUEST_DONE  # ablation / job states after which nothing changes
_FEATURE_RE = re.compile(r"^\s*[Ll]?(\d+)\s*[:/_,.]\s*(\d+)\s*$")


class TokenCell(BaseModel):
    step: int
    text: str
    id: int
    logprob: float | None = None
    kl: float | None = None
    diverged: bool = False
    hesitation: bool = False


class Condition(BaseModel):
    name: str
    tokens: list[TokenCell]
    n_tokens: int
    n_hesitations: int


class RequestView(BaseModel):
    """The parts of a stored (resolved) request a page shows."""

    prompt: str
    features: list[tuple[int, int]]
    layers: list[int] = []
    complement: bool = False
    mode: str
    value: float | None
    positions: str
    max_new_tokens: int | None = None
    compare: list[str] = []


class AblationInfo(BaseModel):
    id: int
    status: str
    request: RequestView
    created: datetime | None
    finished: datetime | None
    summary: dict[str, Any] | None
    error: str | None
    job_id: int | None
    job_status: str | None = None
    progress: dict[str, Any] | None = None


class AblationPage(BaseModel):
    run: RunRef
    ablation: AblationInfo
    conditions: list[Condition]
    divergence: int | None = Field(description="First step where ablated and unablated differ (None: identical).")
    kl_total: float | None
    kl_max: float | None
    done: bool = Field(description="False while the worker may still add tokens (the page keeps polling).")
    history: list[LinkItem]
    prompt_tokens: list[Tok] = Field([], description="The prompt's stored token ids, decoded (empty for free text).")
    feature_labels: dict[str, str] = Field({}, description="The shown label of the first features listed, by "
                                           "'layer/index'.")


class AblationList(BaseModel):
    run: RunRef
    ablations: list[LinkItem]


class AblateForm(BaseModel):
    """What the ablate form posts; features as text: ``layer:index`` pairs separated by spaces or commas.

    The prompt comes from ``source``: ``example`` (a stored feature example: its token ids up to where the
    feature fires), ``prompt_id`` (a stored prompt's ids, optionally its first ``prompt_tokens``), ``token_ids``
    (explicit ids, space-separated) or ``text`` (free text the worker puts in the run's chat format). Without
    ``source`` the first given of prompt_id, example_id, token_ids, prompt is used. Everything else about a
    request is checked by the store's request model (``app.db.requests``), so there is one validation.
    """

    source: Literal["text", "example", "prompt_id", "token_ids"] | None = None
    prompt: str = Field("", max_length=100_000)
    prompt_id: int | None = Field(None, description="A stored prompt (its token ids) instead of free text.")
    prompt_tokens: int | None = Field(None, description="With prompt_id or token_ids: keep only the first N tokens.")
    example_id: int | None = Field(None, description="A stored feature example: its ids up to its focus token.")
    token_ids: str | None = Field(None, max_length=1_000_000, description="Explicit token ids, space-separated.")
    target_token_id: int | None = Field(None, description="Report this token's probability before and after.")
    features: str = Field("", max_length=200_000)
    feature_set: str | None = Field(None, max_length=200, description="A stored set's name (with or instead of features).")
    mode: Literal["zero", "scale", "clamp"] = "zero"
    value: float | None = None
    positions: Literal["all", "prompt", "generated"] = "all"
    max_new_tokens: int = Field(64, ge=1)
    compare: list[Literal["target", "hybrid"]] = []

    @field_validator("value", "prompt_id", "prompt_tokens", "example_id", "target_token_id", "token_ids", "source",
                     "feature_set", mode="before")
    @classmethod
    def _blank_value(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    def prompt_source(self) -> str:
        if self.source is not None:
            return self.source
        for name, attr in (("prompt_id", self.prompt_id), ("example", self.example_id), ("token_ids", self.token_ids)):
            if attr is not None:
                return name
        return "text"


def parse_features(text: str, *, required: bool = True) -> list[tuple[int, int]]:
    """``"3:17, 5:2"`` (or ``3/17``, ``L3/17``, one per line) → ``[(3, 17), (5, 2)]``, in order, without
    repeats; ``required``: none given is a 422."""
    out: list[tuple[int, int]] = []
    for part in re.split(r"[\s;,]+", text.strip()):
        if not part:
            continue
        m = _FEATURE_RE.match(part)
        if m is None:
            raise BadInput(f"Cannot read feature {part!r}: write features as layer:index, e.g. 3:17", 422)
        pair = (int(m.group(1)), int(m.group(2)))
        if pair not in out:
            out.append(pair)
    if required and not out:
        raise BadInput("No features given: write at least one as layer:index, e.g. 3:17", 422)
    return out


def _parse_ids(text: str | None) -> list[int]:
    try:
        ids = [int(t) for t in re.split(r"[\s,]+", (text or "").strip()) if t]
    except ValueError:
        raise BadInput("token_ids must be whole numbers separated by spaces", 422) from None
    if not ids:
        raise BadInput("token_ids is empty", 422)
    return ids


def request_from_form(run_id: int, form: AblateForm) -> dict[str, Any]:
    """The form as the store's ``AblationRequest`` payload; the prompt from the chosen source only."""
    source = form.prompt_source()
    if source == "example":
        if form.example_id is None:
            raise BadInput("source=example needs example_id", 422)
        prompt: dict[str, Any] = {"example_id": form.example_id}
    elif source == "prompt_id":
        if form.prompt_id is None:
            raise BadInput("source=prompt_id needs prompt_id", 422)
        prompt = {"prompt_id": form.prompt_id, "prompt_tokens": form.prompt_tokens}
    elif source == "token_ids":
        prompt = {"token_ids": _parse_ids(form.token_ids), "prompt_tokens": form.prompt_tokens}
    else:
        prompt = {"prompt": form.prompt}
    features = [list(f) for f in parse_features(form.features)] if form.features.strip() or not form.feature_set else []
    return {
        "run_id": run_id, **prompt, "features": features,
        **({"feature_set": form.feature_set} if form.feature_set else {}),
        "mode": form.mode, "value": None if form.mode == "zero" else form.value, "positions": form.positions,
        "generation": {"max_new_tokens": form.max_new_tokens}, "compare": list(dict.fromkeys(form.compare)),
        "target_token_id": form.target_token_id,
    }


def create_ablation(session: Session, run_key: str | int, form: AblateForm, settings: Any = None) -> int:
    """Validate with the worker's rules, store the ablation and its high-priority ``ablate`` job; return its id.

    One transaction: a refused request stores nothing. Refusals become :class:`BadInput` with the
    worker's message and status (404 for a missing run/set/prompt, 422 otherwise).
    """
    from app.db.requests import AblationLimits, submit_ablation  # no torch

    run = get_run(session, run_key)
    limits = AblationLimits.from_settings(settings) if settings is not None else AblationLimits()
    checker = run_prompt_checker(session, run) if form.prompt else None  # stored prompts carry their ids
    request = request_from_form(run.id, form)
    return stored_request(session, lambda: submit_ablation(
        session, request, limits=limits, encode=checker.encode if checker else None,
        context_length=checker.context_length if checker else None))


def request_view(stored: dict[str, Any] | None) -> RequestView:
    """Read ``ablations.request`` (the worker's ResolvedAblation, or a plain request) for display."""
    stored = stored or {}
    req = stored.get("request") if isinstance(stored.get("request"), dict) else stored
    sel = stored.get("selection") if isinstance(stored.get("selection"), dict) else req
    prompt = req.get("prompt")
    if prompt is None:
        ids = req.get("token_ids")
        prompt = (stored.get("prompt_text")
                  or (f"stored prompt {req['prompt_id']}" if req.get("prompt_id") is not None else None)
                  or (f"stored example {req['example_id']}" if req.get("example_id") is not None else None)
                  or (f"{len(ids)} token ids" if isinstance(ids, list) else "the stored prompt"))
    feats = [(int(f[0]), int(f[1])) for f in sel.get("features") or [] if isinstance(f, list | tuple) and len(f) == 2]
    gen = req.get("generation") if isinstance(req.get("generation"), dict) else {}
    return RequestView(
        prompt=str(prompt), features=feats, layers=list(sel.get("all_layers") or sel.get("layers") or []),
        complement=bool(sel.get("complement")), mode=str(sel.get("mode") or "zero"),
        value=sel.get("value") if isinstance(sel.get("value"), int | float) else None,
        positions=str(sel.get("positions") or "all"),
        max_new_tokens=gen.get("max_new_tokens") or req.get("max_new_tokens"), compare=list(req.get("compare") or []),
    )


def _ablation(session: Session, run_id: int, ablation_id: int) -> Ablation:
    a = session.get(Ablation, ablation_id)
    if a is None or a.run_id != run_id:
        raise NotFound(f"No ablation {ablation_id} in run {run_id}.")
    return a


def ablation_page_head(session: Session, run_key: str | int, ablation_id: int) -> Ablation:
    """The ablation row of a run (404 otherwise): what a stream checks before it starts."""
    return _ablation(session, get_run(session, run_key).id, ablation_id)


def ablation_page(session: Session, run_key: str | int, ablation_id: int) -> AblationPage:
    run = get_run(session, run_key)
    a = _ablation(session, run.id, ablation_id)
    words = hesitation_words(run)
    vocab = run_vocab(session, run)
    by_cond: dict[str, list[TokenCell]] = {}
    for t in session.scalars(
        select(AblationToken).where(AblationToken.ablation_id == a.id).order_by(AblationToken.condition, AblationToken.step)
    ):
        text = vocab.text(t.token_id) if vocab.tokenizer is not None else t.token_str
        by_cond.setdefault(t.condition, []).append(TokenCell(
            step=t.step, text=text, id=t.token_id, logprob=t.logprob, kl=t.kl))
    for cells in by_cond.values():  # one rule for every page: words in the decoded text of the condition
        pieces = vocab.pieces([c.id for c in cells]) if vocab.tokenizer is not None else [c.text for c in cells]
        for c, mark in zip(cells, hesitation_marks(pieces, words), strict=True):
            c.hesitation = mark
    names = [c for c in CONDITION_ORDER if c in by_cond] + sorted(c for c in by_cond if c not in CONDITION_ORDER)
    divergence = None
    un, ab = by_cond.get("unablated", []), by_cond.get("ablated", [])
    for i in range(min(len(un), len(ab))):
        if un[i].id != ab[i].id:
            divergence = i
            break
    else:
        if un and ab and len(un) != len(ab) and a.status in DONE_STATES:
            divergence = min(len(un), len(ab))
    if divergence is not None:
        for cells in (un, ab):
            for c in cells[divergence:]:
                c.diverged = True
    conditions = [Condition(name=n, tokens=by_cond[n], n_tokens=len(by_cond[n]),
                            n_hesitations=sum(c.hesitation for c in by_cond[n])) for n in names]
    kls = [c.kl for c in ab if c.kl is not None]
    job = session.get(Job, a.job_id) if a.job_id else None
    job_status = (job.status.value if hasattr(job.status, "value") else str(job.status)) if job else None
    done = a.status in DONE_STATES or job_status in DONE_STATES
    history = [ablation_item(x) for x in session.scalars(
        select(Ablation).where(Ablation.run_id == run.id).order_by(Ablation.id.desc()).limit(30))]
    return AblationPage(
        run=run_ref(run),
        ablation=AblationInfo(id=a.id, status=a.status, request=request_view(a.request), created=a.created,
                              finished=a.finished, summary=a.summary, error=a.error, job_id=a.job_id,
                              job_status=job_status, progress=job.progress if job else None),
        conditions=conditions, divergence=divergence, kl_total=sum(kls) if kls else None,
        kl_max=max(kls) if kls else None, done=done, history=history,
        prompt_tokens=token_views(vocab, list((a.request or {}).get("prompt_ids") or []), None, words),
        feature_labels=shown_labels(session, run.id, request_view(a.request).features[:LABELLED_FEATURES]),
    )


LABELLED_FEATURES = 12  # features an ablation page lists by name (and label)


def shown_labels(session: Session, run_id: int, keys: list[tuple[int, int]]) -> dict[str, str]:
    """``{"layer/index": label}`` of the features that have one."""
    if not keys:
        return {}
    rows = session.execute(select(Feature.layer, Feature.index, Feature.label).where(
        Feature.run_id == run_id, keys_condition(Feature.layer, Feature.index, keys), Feature.label.is_not(None)))
    return {f"{r.layer}/{r.index}": r.label for r in rows}


def ablation_list(session: Session, run_key: str | int) -> AblationList:
    run = get_run(session, run_key)
    return AblationList(run=run_ref(run), ablations=[ablation_item(x) for x in session.scalars(
        select(Ablation).where(Ablation.run_id == run.id).order_by(Ablation.id.desc()).limit(200))])


def cancel_ablation(session: Session, run_key: str | int, ablation_id: int) -> bool:
    """Cancel an ablation (its job stops between two tokens; what was generated stays)."""
    return cancel_request(session, _ablation(session, get_run(session, run_key).id, ablation_id))


def tokens_after(session: Session, ablation_id: int, seen: dict[str, int]) -> list[dict[str, Any]]:
    """Streamed tokens of an ablation not yet sent (``seen``: the last step sent per condition), as dicts."""
    low = min(seen.values(), default=-1) if seen else -1
    rows = session.scalars(select(AblationToken).where(AblationToken.ablation_id == ablation_id,
                                                      AblationToken.step > low)
                           .order_by(AblationToken.step, AblationToken.condition))
    out = []
    for t in rows:
        if t.step > seen.get(t.condition, -1):
            out.append({"condition": t.condition, "step": t.step, "id": t.token_id, "text": t.token_str,
                        "kl": t.kl, "logprob": t.logprob})
    return out


def ablation_state(session: Session, ablation_id: int) -> tuple[str, bool]:
    """(status, done) of an ablation, its job's state included."""
    a = session.get(Ablation, ablation_id)
    if a is None:
        return "missing", True
    job = session.get(Job, a.job_id) if a.job_id else None
    job_status = (job.status.value if hasattr(job.status, "value") else str(job.status)) if job else None
    return a.status, a.status in DONE_STATES or job_status in DONE_STATES
