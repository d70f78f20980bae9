"""The dashboard: FastAPI pages with a JSON twin under ``/api/`` for each. Never imports torch."""

from app.web.main import create_app, serve

__all__ = ["create_app", "serve"]
