"""The kind → handler registry, and the context a handler runs with.

A handler is a function of one :class:`JobContext`, registered with its payload model::

    class TrainPayload(BaseModel):
        run_id: int
        config: dict

    @register("train", TrainPayload)
    def train(ctx: JobContext) -> dict:
        for step in ...:
            if ctx.cancelled():
                raise JobInterrupted
            ctx.progress(step, total, "training")
        return {"final_loss": ...}

The worker validates the job's payload with the model before calling the handler (an invalid
payload fails the job at once), and stores the handler's return value (JSON-able, or a pydantic
model) as the job's result. Handlers must write idempotently: a job may run again after a crash or
a retry, so a re-run replaces its rows and never duplicates them (``app.db.write.upsert`` and
``replace_rows``). Keep write transactions short (commit per batch): on SQLite a long one holds
the single write lock and delays the lease heartbeat. The CLI runs the same handlers in the
foreground (``worker.loop.run_inline``).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import queue
from app.db.session import is_disconnect
from app.settings import Settings

log = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL_S = 0.5  # seconds between progress writes (the last step is always written)
CANCEL_CHECK_INTERVAL_S = 0.25  # seconds between cancellation look-ups in the database
_INFRASTRUCTURE_MODULES = {"worker.loop", "worker.handlers", "worker.__main__"}

Handler = Callable[["JobContext"], Any]


class JobInterrupted(Exception):  # noqa: N818 (it is not an error: the job is given back or cancelled)
    """Raised by a handler (or ``JobContext.check``) to stop early: cancelled or shutting down."""


class UnknownJobKind(ValueError):
    """No handler is registered for a job's kind."""


@dataclass(frozen=True)
class HandlerSpec:
    kind: str
    func: Handler
    payload_model: type[BaseModel]


_REGISTRY: dict[str, HandlerSpec] = {}


def register(kind: str, payload_model: type[BaseModel]) -> Callable[[Handler], Handler]:
    """Decorator: make ``func`` the handler of ``kind`` with payloads validated by ``payload_model``."""
    if not (isinstance(payload_model, type) and issubclass(payload_model, BaseModel)):
        raise TypeError(
            f"payload_model for {kind!r} must be a pydantic BaseModel subclass, got {payload_model!r}"
        )

    def decorator(func: Handler) -> Handler:
        existing = _REGISTRY.get(kind)
        if existing is not None and existing.func.__qualname__ != func.__qualname__:
            raise ValueError(
                f"Job kind {kind!r} is already handled by {existing.func.__module__}.{existing.func.__qualname__}"
            )
        _REGISTRY[kind] = HandlerSpec(kind, func, payload_model)
        return func

    return decorator


def unregister(kind: str) -> None:
    """Remove a handler (tests that register throwaway kinds clean up with this)."""
    _REGISTRY.pop(kind, None)


def get_handler(kind: str) -> HandlerSpec:
    try:
        return _REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownJobKind(f"No handler registered for job kind {kind!r} (registered: {known})") from None


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def load_handlers(modules: Sequence[str] | None = None) -> list[str]:
    """Import the modules that register handlers; returns the registered kinds.

    By default every module of the ``worker`` package is imported (handlers register on import),
    so a new handler module needs no list to be edited. Import errors propagate: a worker that
    silently lacks a handler would fail its jobs with "unknown kind" instead.
    """
    if modules is None:
        import worker

        modules = [
            info.name
            for info in pkgutil.walk_packages(worker.__path__, prefix="worker.")
            if info.name not in _INFRASTRUCTURE_MODULES
        ]
    for name in modules:
        importlib.import_module(name)
    return registered_kinds()


# ------------------------------------------------------------------------------------------ context


@dataclass
class JobContext:
    """What a handler gets: its job, validated payload, database access, progress and cancellation.

    ``job_id`` is None when the CLI runs the handler in the foreground; then progress goes to
    ``on_progress`` (a tqdm bar) and nothing is cancelled except by Ctrl-C.
    """

    job_id: int | None
    kind: str
    payload: Any
    session_factory: sessionmaker[Session]
    run_id: int | None = None
    attempt: int = 1
    on_progress: Callable[[float, float | None, str | None], None] | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    settings: Settings | None = None  # of the process running the job (data dir, device); None in bare tests
    _last_progress: float = field(default=0.0, repr=False)
    _last_cancel_check: float = field(default=0.0, repr=False)
    _cancelled: bool = field(default=False, repr=False)

    def job_settings(self) -> Settings:
        """The worker's settings (data directory, device) pointed at this job's database."""
        base = self.settings or Settings()
        return base.model_copy(update={"database_url": self.engine.url.render_as_string(hide_password=False)})

    @property
    def engine(self) -> Engine:
        bind = self.session_factory.kw["bind"]
        return bind

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.session_factory() as session, session.begin():
            yield session

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress; database writes are throttled to one per ``PROGRESS_MIN_INTERVAL_S``."""
        if self.on_progress is not None:
            self.on_progress(done, total, message)
        if self.job_id is None:
            return
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_MIN_INTERVAL_S and (total is None or done < total):
            return
        self._last_progress = now
        try:
            queue.set_progress(self.engine, self.job_id, done, total, message)
        except Exception as exc:
            if not is_disconnect(exc):
                raise
            log.debug("Job %s: progress not recorded (database unreachable)", self.job_id)  # the next one will be

    def cancelled(self) -> bool:
        """True once a user cancelled the job or the worker is shutting down: stop soon."""
        if self.stop_event.is_set() or self._cancelled:
            return True
        if self.job_id is None:
            return False
        now = time.monotonic()
        if now - self._last_cancel_check >= CANCEL_CHECK_INTERVAL_S:
            self._last_cancel_check = now
            try:
                self._cancelled = queue.is_cancelled(self.engine, self.job_id)
            except Exception as exc:
                if not is_disconnect(exc):
                    raise
                # The database is unreachable: keep working (a cancel is seen once it is back; the heartbeat
                # notices if the lease went to another worker meanwhile).
        return self._cancelled

    def check(self) -> None:
        """Raise :class:`JobInterrupted` if the handler should stop (call between steps)."""
        if self.cancelled():
            raise JobInterrupted(f"Job {self.job_id} interrupted (cancelled or worker stopping)")
