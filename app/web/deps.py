"""Annotated dependency aliases shared by the routers (the FastAPI template's ``api/deps.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.settings import Settings
from app.web.data.common import DATA_DIR_KEY


def get_session(request: Request) -> Iterator[Session]:
    """One session per request from the app's sessionmaker; closed when the response is sent."""
    session = request.app.state.sessionmaker()
    session.info[DATA_DIR_KEY] = request.app.state.settings.data_dir  # organism tokenizers live there
    try:
        yield session
    finally:
        session.close()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
