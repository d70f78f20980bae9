"""The ``lens`` request: validation against the store, the cache by run and token ids, and submission. Torch-free.

A lens request names a run and a text: free ``prompt`` text (the worker puts it in the run's chat format, as an
ablation's, unless ``chat`` is off or it is already formatted) or explicit ``token_ids``; ``features`` are
watched (their activation is kept at every position, for a feature page's "test your text").

Cache: a request whose run and content (text or ids, chat flag, watched features) match a stored one that is
waiting, running or done gets that one back, with no new job; the worker, once it has the token ids, reuses
the result of any finished lens of the same run and ids (``token_key``) instead of running the models again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import queue
from app.db.requests import (
    MAX_ID,
    MAX_INDEX,
    AblationLimits,
    AblationRequestError,
    _check_text,
    _parse,
    _run,
    check_interactive_room,
)
from app.db.schema import LensResult

log = logging.getLogger(__name__)

LENS_PRIORITY = 100  # interactive: a person waits for it
MAX_LENS_CHARS = 100_000  # free text beyond this is refused before tokenizing
MAX_LENS_TOKENS = 8192  # explicit token ids (the worker also refuses more than the model's context)
MAX_WATCHED = 16  # watched features per request
REUSABLE = ("todo", "running", "done")  # states of a stored lens a new identical request may reuse

Index = Annotated[int, Field(ge=0, le=MAX_INDEX)]


class LensRequest(BaseModel):
    """One text to look at through the diff lens: exactly one of ``prompt`` and ``token_ids``."""

    model_config = ConfigDict(extra="forbid")

    run_id: int = Field(ge=1, le=MAX_ID)
    prompt: str | None = Field(None, max_length=MAX_LENS_CHARS, description="Free text (put in the run's chat "
                               "format by the worker unless chat is off or it is formatted already).")
    token_ids: list[Annotated[int, Field(ge=0, le=MAX_ID)]] | None = Field(
        None, min_length=1, max_length=MAX_LENS_TOKENS, description="Token ids exactly as the models see them.")
    chat: bool = True
    features: list[tuple[Index, Index]] = Field(default_factory=list, max_length=MAX_WATCHED,
                                                description="Watched features: activation kept at every token.")

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: object) -> object:
        _check_text(data, ())
        return data

    @field_validator("prompt", mode="after")
    @classmethod
    def _unix_newlines(cls, v: str | None) -> str | None:
        return v.replace("\r\n", "\n").replace("\r", "\n") if v is not None else None

    @model_validator(mode="after")
    def _one_text(self) -> LensRequest:
        given = [n for n in ("prompt", "token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, token_ids (got {given or 'none'})")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("the text is empty")
        self.features = sorted({(int(a), int(b)) for a, b in self.features})
        return self


def token_key(token_ids: Sequence[int]) -> str:
    """The cache key of a token sequence (sha256 of the ids)."""
    return hashlib.sha256(json.dumps([int(t) for t in token_ids]).encode()).hexdigest()


def request_key(req: LensRequest) -> str:
    """The cache key of a request's content (its run is a column of its own)."""
    content = {"prompt": req.prompt, "token_ids": req.token_ids, "chat": req.chat if req.prompt is not None else None,
               "features": [list(f) for f in req.features]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def validate_lens(session: Session, data: LensRequest | dict) -> LensRequest:
    req: LensRequest = _parse(LensRequest, data)
    run = _run(session, req.run_id)
    for layer, index in req.features:
        if not run.has_feature(layer, index):
            raise AblationRequestError(f"unknown feature ({layer}, {index}): run {run.id} has {run.n_layers} layers "
                                       f"× {run.n_features} features")
    return req


def find_cached(session: Session, run_id: int, key: str) -> LensResult | None:
    """The newest stored lens of this run and request content that is waiting, running or done."""
    return session.scalars(select(LensResult).where(LensResult.run_id == run_id, LensResult.request_key == key,
                                                    LensResult.status.in_(REUSABLE))
                           .order_by(LensResult.id.desc()).limit(1)).first()


def submit_lens(session: Session, data: LensRequest | dict, *,
                limits: AblationLimits = AblationLimits()) -> tuple[int, int | None]:
    """Validate and store a lens request and queue its ``lens`` job, or return the stored identical one.

    Returns ``(lens_id, job_id)``; the caller commits. Refusals are :class:`AblationRequestError` (404: unknown
    run; 422: the rest; 429: too much interactive work waiting).
    """
    req = validate_lens(session, data)
    key = request_key(req)
    cached = find_cached(session, req.run_id, key)
    if cached is not None:
        log.info("lens %s reused for an identical request", cached.id)
        return cached.id, cached.job_id
    check_interactive_room(session, req.run_id, limits)
    row = LensResult(run_id=req.run_id, status="todo", request=req.model_dump(mode="json"), request_key=key,
                     token_key=token_key(req.token_ids) if req.token_ids is not None else None,
                     n_tokens=len(req.token_ids) if req.token_ids is not None else None)
    session.add(row)
    session.flush()
    row.job_id = queue.enqueue(session, "lens", {"lens_id": row.id}, priority=LENS_PRIORITY, run_id=row.run_id,
                               max_attempts=2)
    session.flush()
    log.info("lens %s queued as job %s", row.id, row.job_id)
    return row.id, row.job_id
