"""The one-line progress display of ``adapterlens up``: the running jobs, read from the store once a second.

Each running job is shown as the jobs page shows it (percentage, steps, message, time left at the rate so
far: ``app.web.data.jobs.job_view``), e.g. ``#12 train 45% 360/800 training · 2m10s left``, joined on one line that rich keeps at the bottom of the terminal while log lines scroll above it. Nothing is shown
when the output is not a terminal (compose logs, CI).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db.schema import Job, JobStatus
from app.web.data.jobs import JobView, job_view
from app.web.templating import duration

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # seconds between looks at the running jobs


def _duration(seconds: float) -> str:
    return duration(seconds, compact=True)


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.3g}"


def describe(job: JobView) -> str:
    """One running job as the jobs page shows it (``app.web.data.jobs.job_view``), in a short phrase."""
    parts = [f"#{job.id} {job.kind}"]
    if job.percent is not None and job.step is not None and job.total:
        parts.append(f"{job.percent:.0f}% {_number(job.step)}/{_number(job.total)}")
    elif job.step is not None:
        parts.append(_number(job.step))
    message = (job.progress or {}).get("message")
    if message:
        parts.append(str(message)[:40])
    text = " ".join(parts)
    if job.eta_s is not None:
        text += f" · {_duration(job.eta_s)} left"
    return text


def running_line(engine: Engine, width: int = 120) -> str:
    """The running jobs (oldest first) on one line of at most ``width`` characters, or an idle message."""
    with Session(engine) as s:
        running = s.scalars(select(Job).where(Job.status == JobStatus.RUNNING).order_by(Job.id).limit(8)).all()
        waiting = s.scalar(select(Job.id).where(Job.status == JobStatus.TODO).limit(1)) is not None
        views = [job_view(j) for j in running]
    if not views:
        return "▷ idle, jobs waiting (on a dependency, or for their worker class)" if waiting else "▷ idle"
    line = "▶ " + " │ ".join(describe(v) for v in views)
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
