"""The ``lens`` job (interactive): one stored lens request through :func:`worker.lens.diff.diff_lens`.

The text is formatted and tokenized as an ablation's prompt (:func:`worker.ablation.job.format_free_text`,
:func:`~worker.ablation.job.encode`); explicit ids are used as given. A finished lens of the same run and token
ids that watched at least the same features is copied instead of running the models again (the cache by run +
token ids; ``summary.reused_from`` names it). Idempotent: a re-run replaces the row's result.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from app.db import queue
from app.db.lens_request import MAX_LENS_TOKENS, LensRequest, token_key
from app.db.requests import AblationRequestError
from app.db.schema import LensResult, utcnow
from worker.ablation.job import _check_ids, _model, _run_config, encode, format_free_text
from worker.handlers import JobContext, JobInterrupted, register
from worker.lens.diff import diff_lens

log = logging.getLogger(__name__)


class LensPayload(BaseModel):
    lens_id: int


def _set(ctx: JobContext, lens_id: int, **values: Any) -> None:
    with ctx.session() as s:
        row = s.get(LensResult, lens_id)
        for k, v in values.items():
            setattr(row, k, v)


@register("lens", LensPayload)
def lens(ctx: JobContext) -> dict[str, Any]:
    """Run a stored lens request; returns its summary (the result itself is in ``lens_results.result``)."""
    lens_id = ctx.payload.lens_id
    with ctx.session() as s:
        row = s.get(LensResult, lens_id)
        if row is None:
            raise ValueError(f"lens_results row {lens_id} does not exist (deleted after it was queued?)")
        req = LensRequest.model_validate(row.request)
        row.status, row.error, row.finished, row.result, row.summary = "running", None, None, None, None
    try:
        summary = _run_lens(ctx, lens_id, req)
    except JobInterrupted:
        cancelled = ctx.job_id is not None and queue.is_cancelled(ctx.engine, ctx.job_id)
        _set(ctx, lens_id, status="cancelled" if cancelled else "todo", finished=utcnow())
        raise
    except Exception as exc:
        _set(ctx, lens_id, status="failed", error=str(exc), finished=utcnow())
        raise
    return summary


def _cached(ctx: JobContext, lens_id: int, run_id: int, key: str,
            watch: list[tuple[int, int]]) -> tuple[int, dict, dict] | None:
    """A finished lens of this run and token ids whose watched features include ``watch``."""
    want = {f"{a}/{b}" for a, b in watch}
    with ctx.session() as s:
        for row in s.scalars(select(LensResult).where(LensResult.run_id == run_id, LensResult.token_key == key,
                                                      LensResult.status == "done", LensResult.id != lens_id)
                             .order_by(LensResult.id.desc()).limit(5)):
            if row.result is not None and want <= set(row.result.get("watched") or {}):
                return row.id, row.result, row.summary or {}
    return None


def _run_lens(ctx: JobContext, lens_id: int, req: LensRequest) -> dict[str, Any]:
    model, tokenizer = _model(ctx, req.run_id)
    if req.token_ids is not None:
        ids = list(req.token_ids)
    else:
        ids = encode(tokenizer, format_free_text(tokenizer, req.prompt, chat=req.chat,
                                                 config=_run_config(ctx, req.run_id)))
    _check_ids(ids, model)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and len(ids) > context:
        raise AblationRequestError(f"the text has {len(ids)} tokens; the model's context is {context} tokens")
    if len(ids) > MAX_LENS_TOKENS:  # the stored result grows with the text (~2.5 kB a token)
        raise AblationRequestError(f"the text has {len(ids)} tokens; the lens takes at most {MAX_LENS_TOKENS}")
    key = token_key(ids)
    ctx.progress(0, 1, f"{len(ids)} tokens")
    cached = _cached(ctx, lens_id, req.run_id, key, req.features)
    if cached is not None:
        result, summary = cached[1], {**cached[2], "reused_from": cached[0]}
    else:
        ctx.check()
        lens_result = diff_lens(model, ids, watch=req.features)
        result = lens_result.to_json()
        summary = {"n_tokens": len(ids), "mean_kl_hybrid": statistics.fmean(lens_result.kl_hybrid),
                   "mean_kl_adapted": statistics.fmean(lens_result.kl_adapted),
                   "max_kl_hybrid": max(lens_result.kl_hybrid), "max_kl_adapted": max(lens_result.kl_adapted),
                   "features_fired": len(lens_result.table),
                   "seconds": {k: round(v, 4) for k, v in lens_result.seconds.items()}}
    _set(ctx, lens_id, status="done", result=result, summary=summary, token_key=key, n_tokens=len(ids),
         finished=utcnow())
    ctx.progress(1, 1, "done")
    log.info("lens %s: %d tokens%s", lens_id, len(ids), " (cached)" if cached is not None else "")
    return summary
