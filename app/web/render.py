"""Rendering helpers shared by the routers: one context object, two renderers."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.schema import Graph, Prompt


def render(request: Request, template: str, page: BaseModel | None = None, *, status_code: int = 200,
           **extra: Any) -> HTMLResponse:
    """Render ``template`` with the page context (``page``) plus ``extra`` template-only values."""
    templates = request.app.state.templates
    return templates.TemplateResponse(request, template, {"page": page, **extra}, status_code=status_code)


def ablate_limit(request: Request) -> int:
    """The most new tokens the server accepts (the form's maximum agrees with it)."""
    return int(request.app.state.settings.ablation_max_new_tokens)


def example_source(example: Any, label: str = "this example, up to where the feature fires") -> dict[str, Any]:
    """An ablate-form prompt source: a stored example's own token ids up to its focus (never re-formatted)."""
    start = max(0, example.focus - PREVIEW_TOKENS + 1)
    preview = [{"text": t, "kind": k, "hesitation": h} for t, k, h in
               zip(example.tokens[start:example.focus + 1], example.token_kinds[start:example.focus + 1],
                   example.hesitation[start:example.focus + 1], strict=False)]
    return {"value": "example", "label": label + ("…" if start else ""), "fields": {"example_id": example.id},
            "preview": [_Preview(**p) for p in preview]}


def graph_prompt_source(session: Session, run_id: int) -> dict[str, Any] | None:
    """The newest graph's stored prompt up to the position it explains, as an ablate-form source (one query: the
    join keeps graphs whose prompt is stored)."""
    g = session.execute(select(Graph.id, Graph.slug, Graph.prompt_id, Graph.position)
                        .join(Prompt, Prompt.id == Graph.prompt_id)
                        .where(Graph.run_id == run_id).order_by(Graph.id.desc()).limit(1)).first()
    if g is None:
        return None
    fields: dict[str, Any] = {"prompt_id": g.prompt_id}
    if g.position is not None:
        fields["prompt_tokens"] = g.position + 1
    return {"value": "prompt_id", "label": f"the prompt of graph {g.slug}", "fields": fields, "preview": None}


PREVIEW_TOKENS = 24  # tokens of a stored prompt shown in the ablate form


class _Preview(BaseModel):
    text: str
    kind: str = "text"
    hesitation: bool = False
