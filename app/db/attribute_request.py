"""The ``attribute`` job's payload (one attribution graph) and its submission from the web app, torch-free.

One model for both sides: the graph page's "new graph" form and the API validate with it before queueing,
and the worker's handler (:mod:`worker.hesitation.job`) validates the same payload again when it runs (the
checks that need the tokenizer, such as "the target is one token", happen there and fail the job with a
clear message).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import Prompt, Run
from app.db.text import has_nul

log = logging.getLogger(__name__)

ATTRIBUTE_PRIORITY = 100  # interactive, like an ablation: a person waits for the graph
STUDY_SLUG_PREFIX = "hesitation-"
SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"
MAX_PROMPT_CHARS = 100_000


class AttributePayload(BaseModel):
    """One graph. Give exactly one of ``prompt`` (text), ``token_ids`` or ``prompt_id`` (a stored prompt)."""

    model_config = ConfigDict(extra="forbid")

    run_id: int
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS,
                               description="Text, tokenized with the run's tokenizer (+ bos).")
    token_ids: list[int] | None = Field(None, min_length=1, description="Token ids exactly as the model sees them.")
    prompt_id: int | None = Field(None, description="A row of `prompts` of this run (its token ids).")
    chat: bool = Field(False, description="Wrap `prompt` in the chat format (user turn, assistant, <think>).")
    target_token: StrictInt | StrictStr | None = Field(None, description="Vocab id or single-token text; always a "
                                                       "logit node (strict: a JSON true is not id 1).")
    contrast_token: StrictInt | StrictStr | None = Field(
        None, description="The other side of a logit difference (target − contrast): a vocab id, single-token "
        "text, or 'auto' (the most probable token that is not a hesitation token); also a logit node.")
    mode: Literal["relp", "frozen-mlp"] = "relp"
    max_feature_nodes: int = Field(10_000, ge=1, le=100_000)
    max_n_logits: int = Field(10, ge=1, le=100)
    desired_logit_prob: float = Field(0.95, gt=0.0, le=1.0)
    node_threshold: float = Field(0.8, ge=0.0, le=1.0)
    edge_threshold: float = Field(0.98, ge=0.0, le=1.0)
    batch_size: int = Field(32, ge=1, le=4096)
    slug: str | None = Field(None, pattern=SLUG_PATTERN, description="Graph id in the run (default: from content).")

    @model_validator(mode="after")
    def _one_source(self) -> AttributePayload:
        given = [k for k in ("prompt", "token_ids", "prompt_id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, token_ids, prompt_id (got {given or 'none'})")
        if self.prompt is not None and (has_nul(self.prompt) or not self.prompt.strip()):
            raise ValueError("the prompt is empty or contains a NUL character")
        if self.contrast_token is not None and self.target_token is None:
            raise ValueError("a logit difference needs target_token as well as contrast_token")
        if self.slug is not None and self.slug.startswith(STUDY_SLUG_PREFIX):
            raise ValueError(f"slug {self.slug!r}: the prefix {STUDY_SLUG_PREFIX!r} belongs to the hesitation study")
        return self


class AttributeRequestError(ValueError):
    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def submit_attribute(session: Session, data: dict) -> int:
    """Validate a graph request against the store and queue an interactive ``attribute`` job; returns its id.

    The caller commits. Refusals are :class:`AttributeRequestError` (404: unknown run or prompt; 422: the rest).
    """
    try:
        req = AttributePayload.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise AttributeRequestError(f"invalid graph request: {problems}") from None
    if session.get(Run, req.run_id) is None:
        raise AttributeRequestError(f"unknown run {req.run_id}", 404)
    if req.prompt_id is not None:
        row = session.get(Prompt, req.prompt_id)
        if row is None or row.run_id != req.run_id:
            raise AttributeRequestError(f"unknown prompt {req.prompt_id} in run {req.run_id}", 404)
    job_id = queue.enqueue(session, "attribute", req.model_dump(exclude_none=True), priority=ATTRIBUTE_PRIORITY,
                           run_id=req.run_id, max_attempts=1)
    log.info("attribute job %s queued for run %s", job_id, req.run_id)
    return job_id
