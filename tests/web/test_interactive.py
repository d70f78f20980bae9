"""Interactive work never waits behind long jobs, and its queue is bounded (429 + Retry-After).

Ordering, not timing: with a long job running and long jobs queued, an ablation submitted through the API is
the next job the interactive worker claims — and the next one a lone all-kinds worker claims — while the
long-job worker never takes it (``adapterlens up`` runs one worker of each class).
"""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import Ablation, JobStatus
from app.settings import Settings
from app.web import create_app
from tests.web.conftest import BASE_URL

LONG_KINDS = ("train", "collect", "hesitation", "experiment", "organism")


def _submit(client: TestClient, run_id: int, prompt: str = "3 + 4"):
    return client.post(f"/api/runs/{run_id}/ablations", json={"features": "1:3", "prompt": prompt})


def _job_of(web, ablation_id: int) -> int:
    with Session(web.engine) as s:
        return s.get(Ablation, ablation_id).job_id


def test_an_ablation_is_claimed_before_every_long_job(web):
    run_id = web.world.run_id
    assert queue.get_job(web.engine, web.world.job_ids["collect"]).status is JobStatus.RUNNING  # a long job runs
    for kind in LONG_KINDS:  # long jobs wait, one of them at the ablation's own priority
        queue.enqueue(web.engine, kind, {"run_id": run_id}, run_id=run_id, priority=100 if kind == "train" else 0)

    first = _submit(web.client, run_id)
    assert first.status_code == 201
    claimed = queue.claim_job(web.engine, "interactive-worker", kinds=queue.INTERACTIVE_KINDS)
    assert claimed.id == _job_of(web, first.json()["id"]) and claimed.kind == "ablate"

    second = _submit(web.client, run_id, "5 + 6")
    long_job = queue.claim_job(web.engine, "long-worker", exclude_kinds=queue.INTERACTIVE_KINDS)
    assert long_job.kind in LONG_KINDS  # the long-job worker leaves the ablation to its class
    lone = queue.claim_job(web.engine, "lone-worker", exclude_kinds=("train",))  # a single all-purpose worker
    assert lone.id == _job_of(web, second.json()["id"])  # priority puts it before the waiting long jobs


def test_waiting_interactive_work_is_bounded_with_a_429(web, db_url, tmp_path):
    settings = Settings(database_url=db_url, data_dir=tmp_path, interactive_queue_per_run=2,
                        interactive_queue_total=3)
    app = create_app(settings, engine=web.engine)
    run_id = web.world.run_id
    with TestClient(app, base_url=BASE_URL, headers={"Origin": BASE_URL}) as client:
        assert [_submit(client, run_id).status_code for _ in range(2)] == [201, 201]
        refused = _submit(client, run_id)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert "for this run (limit 2)" in refused.json()["detail"]
        form = client.post(f"/runs/{run_id}/ablations", data={"features": "1:3", "prompt": "3 + 4"})
        assert form.status_code == 429 and form.headers["Retry-After"] and "try again in" in form.text

        # The overall bound: another run's requests count too.
        for _ in range(2):
            queue.enqueue(web.engine, "lens", {}, run_id=web.world.empty_run_id)
        assert queue.claim_job(web.engine, "w", kinds=["ablate"]) is not None  # one for this run starts: room here
        refused = _submit(client, run_id)
        assert refused.status_code == 429 and "in all (limit 3)" in refused.json()["detail"]
