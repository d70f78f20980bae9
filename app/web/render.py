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


def default_prompt(session: Session, run_id: int) -> str:
    """A prompt to pre-fill the ablate form with: the newest graph's prompt, else the run's first prompt."""
    text = session.scalar(select(Graph.prompt).where(Graph.run_id == run_id).order_by(Graph.id.desc()).limit(1))
    if text:
        return text
    return session.scalar(select(Prompt.text).where(Prompt.run_id == run_id).order_by(Prompt.id).limit(1)) or ""
