"""The one-line display of ``adapterlens up``: running jobs as the jobs page computes them."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db.schema import Job, JobStatus, utcnow
from app.progress_line import running_line


def test_running_jobs_on_one_line(db_engine: Engine) -> None:
    assert running_line(db_engine) == "▷ idle"
    now = utcnow()
    with Session(db_engine) as s, s.begin():
        s.add(Job(kind="train", payload={}, status=JobStatus.RUNNING, started=now - timedelta(seconds=90),
                  progress={"done": 360, "total": 800, "message": "training"}))
        s.add(Job(kind="ablate", payload={}, status=JobStatus.RUNNING, started=now, progress=None))
        s.add(Job(kind="collect", payload={}, status=JobStatus.TODO))
    line = running_line(db_engine)
    assert line.startswith("▶ #1 train 45% 360/800 training · 1m5")  # 90 s for 360 steps: 110 s left
    assert " │ #2 ablate" in line
    assert len(running_line(db_engine, width=30)) == 30
