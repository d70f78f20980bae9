"""Every job kind that knows its length reports step / total, a percentage and the time left.

The demo pipeline of the tiny organism runs through a real worker (organism build, train, collect, evaluate,
hesitation study), then an ablation, an experiment and an attribution graph are requested as a user would;
the jobs API must show each finished job at its total, and a running job's time left must follow its rate.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient

from app.db.schema import Job, JobStatus, utcnow
from app.db.session import make_engine
from app.web import create_app
from app.web.data.jobs import job_view

KNOWS_ITS_LENGTH = ("organism", "train", "evaluate", "collect", "hesitation", "ablate", "experiment", "attribute")


def test_running_job_percent_and_time_left() -> None:
    now = utcnow()
    job = Job(id=1, kind="train", status=JobStatus.RUNNING, priority=0, attempts=1, max_attempts=3,
              progress={"done": 25, "total": 100, "message": "loss 1.2"}, started=now - timedelta(seconds=10),
              payload={})
    view = job_view(job, now)
    assert (view.step, view.total, view.percent) == (25, 100, 25.0)
    assert view.elapsed_s == 10 and abs(view.eta_s - 30) < 1e-9
    done = job_view(Job(id=2, kind="train", status=JobStatus.SUCCEEDED, priority=0, attempts=1, max_attempts=3,
                        progress={"done": 100, "total": 100}, started=now - timedelta(seconds=40),
                        finished=now - timedelta(seconds=4), payload={}), now)
    assert done.percent == 100 and done.elapsed_s == 36 and done.eta_s is None


def test_every_job_kind_reports_its_total(tiny_demo) -> None:
    settings = tiny_demo["settings"]
    engine = make_engine(settings)
    client = TestClient(create_app(settings, engine=engine), base_url="http://127.0.0.1")
    jobs = client.get("/api/jobs").json()
    assert not jobs["failed"], [(j["kind"], j["error_line"]) for j in jobs["failed"]]
    finished = {j["kind"]: j for j in jobs["finished"]}
    for kind in KNOWS_ITS_LENGTH:
        j = finished[kind]
        assert j["total"] and j["step"] == j["total"] and j["percent"] == 100, (kind, j["progress"])
        assert j["elapsed_s"] is not None and j["started"] and j["finished"]
    html = client.get("/jobs").text
    assert "data-elapsed" in html and "100%" in html
    engine.dispose()
