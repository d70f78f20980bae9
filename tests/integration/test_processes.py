"""The compose stack's service commands, run as real processes on 127.0.0.1 (no Docker engine needed).

db → a throwaway Postgres database (empty, not from the migrated template); migrate → ``adapterlens db
upgrade`` and ``adapterlens bootstrap`` with torch made unimportable, as in the app image; app →
``adapterlens serve`` on a free port; worker → ``adapterlens worker``. One ``organism`` job (preset
organism-tiny) queued with ``adapterlens enqueue`` must succeed, seen through ``/api/jobs`` and ``/jobs``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 90  # the whole job: organism-tiny builds in seconds, the worker imports torch first
# The app image installs the base package only: the same CLI, with the ml extra's packages (and numpy,
# which only they bring) unimportable.
ML_ONLY = ("torch", "transformers", "safetensors", "tokenizers", "huggingface_hub", "numpy")
NO_TORCH = (f"import sys; sys.modules.update(dict.fromkeys({ML_ONLY!r})); "
            "from app.cli import main; sys.argv = ['adapterlens', *sys.argv[1:]]; main()")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def empty_pg_url(pg_server_url: str, pg_admin: Engine) -> Iterator[str]:
    """A brand-new, unmigrated Postgres database (the stack's first start)."""
    name = f"adapterlens_proc_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    with pg_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def stack_env(empty_pg_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERLENS_")}
    return env | {
        "DATABASE_URL": empty_pg_url, "ADAPTERLENS_DATA_DIR": str(tmp_path / "data"), "ADAPTERLENS_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
    }


def _cli(env: dict[str, str], *args: str, torch_free: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", NO_TORCH, *args] if torch_free else [sys.executable, "-m", "app.cli", *args]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"adapterlens {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def _wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


def _job(jobs: dict, job_id: int) -> dict | None:
    for group in ("running", "waiting", "failed", "finished"):
        for job in jobs[group]:
            if job["id"] == job_id:
                return job
    return None


def test_the_stack_as_processes_runs_a_job_end_to_end(stack_env: dict[str, str]) -> None:
    # migrate: schema, then bootstrap (demo off here: the demo pipeline takes minutes), both without torch
    assert "database at head" in _cli(stack_env, "db", "upgrade", torch_free=True).stdout
    boot = _cli(stack_env | {"ADAPTERLENS_DEMO": "0"}, "bootstrap", torch_free=True)
    assert "nothing to queue" in boot.stdout
    queued = _cli(stack_env, "enqueue", "organism", "--payload", json.dumps({"preset": "organism-tiny", "seed": 0}),
                  torch_free=True)
    job_id = int(queued.stdout.split("queued job ")[1].split()[0])

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", NO_TORCH, "serve", "--host", "127.0.0.1", "--port", str(port)],
                              env=stack_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = None
    try:
        _wait_for_http(f"{base}/api/jobs", server)
        jobs = json.loads(_get(f"{base}/api/jobs")[1])
        assert _job(jobs, job_id)["status"] == "todo"  # nothing runs it yet

        worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=stack_env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        end = time.monotonic() + DEADLINE_S
        job = None
        while time.monotonic() < end:
            assert worker.poll() is None, f"worker exited early:\n{_stop(worker)}"
            job = _job(json.loads(_get(f"{base}/api/jobs")[1]), job_id)
            if job and job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        assert job is not None and job["status"] == "succeeded", f"job: {job}\nworker log:\n{_stop(worker)}"
        assert job["finished"] is not None and job["attempts"] == 1

        status, html = _get(f"{base}/jobs")
        assert status == 200
        assert f'data-job="{job_id}" data-status="succeeded"' in html  # the page shows it, finished
        organism_dir = Path(stack_env["ADAPTERLENS_DATA_DIR"]) / "models"
        assert any(organism_dir.rglob("config.json")), "the organism job wrote no model"
    finally:
        worker_log = _stop(worker) if worker is not None else ""
        server_log = _stop(server)
    assert server.returncode is not None and worker.returncode is not None
    assert "Traceback" not in server_log, server_log
    assert "Traceback" not in worker_log, worker_log
