"""The one-line progress display of ``adapterlens up``: the running jobs, read from the store once a second.

Jobs store ``progress = {done, total, message}``; this shows each running job as
``#12 train 45% 360/800 training · 2m10s left`` (the time left from the job's rate since it started), joined
on one line that rich keeps at the bottom of the terminal while log lines scroll above it. Nothing is shown
when the output is not a terminal (compose logs, CI).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db.schema import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # seconds between looks at the running jobs


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _number(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.4g}" if isinstance(x, float) else str(x)


def describe(job_id: int, kind: str, progress: dict[str, Any] | None, started: datetime | None,
             now: datetime) -> str:
    """One running job as a short phrase."""
    p = progress or {}
    done, total, message = p.get("done"), p.get("total"), p.get("message")
    parts = [f"#{job_id} {kind}"]
    numeric = isinstance(done, int | float) and isinstance(total, int | float) and total > 0
    if numeric:
        parts.append(f"{100 * done / total:.0f}% {_number(done)}/{_number(total)}")
    elif isinstance(done, int | float):
        parts.append(_number(done))
    if message:
        parts.append(str(message)[:40])
    text = " ".join(parts)
    if numeric and started is not None and 0 < done < total:
        elapsed = (now - started).total_seconds()
        text += f" · {_duration(elapsed * (total - done) / done)} left"
    return text


def running_line(engine: Engine, width: int = 120) -> str:
    """The running jobs (oldest first) on one line of at most ``width`` characters, or a waiting message."""
    with Session(engine) as s:
        rows = s.execute(select(Job.id, Job.kind, Job.progress, Job.started)
                         .where(Job.status == JobStatus.RUNNING).order_by(Job.id).limit(8)).all()
        waiting = s.scalar(select(Job.id).where(Job.status == JobStatus.TODO).limit(1)) is not None
    now = utcnow()
    if not rows:
        return "▷ idle, jobs waiting (dependencies or a busy worker class)" if waiting else "▷ idle"
    line = "▶ " + " │ ".join(describe(r.id, r.kind, r.progress, r.started, now) for r in rows)
    return line if len(line) <= width else line[: width - 1] + "…"


class ProgressLine:
    """Keeps :func:`running_line` at the bottom of a rich ``Live`` display, refreshed every ``REFRESH_S``."""

    def __init__(self, engine: Engine, live: Any) -> None:
        self.engine, self.live = engine, live
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-line", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _run(self) -> None:
        from rich.text import Text

        while not self._stop.wait(REFRESH_S):
            try:
                line = running_line(self.engine, max(self.live.console.width - 1, 40))
            except Exception as exc:  # noqa: BLE001 (a database restart: show it, try again)
                line = f"▷ database unreachable ({type(exc).__name__})"
            self.live.update(Text(line, style="bold cyan", no_wrap=True, overflow="ellipsis"))
