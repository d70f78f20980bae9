"""``adapterlens up`` as a person runs it: two workers (interactive and long), a killed worker restarted and
shown on the jobs page, quiet request logs, and SIGTERM stopping every child (none orphaned)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.pg_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 90.0  # seconds for the workers to start (each imports torch) or restart


def _jobs(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/jobs", timeout=5) as resp:
        return json.load(resp)


def _workers(url: str) -> dict[str, dict]:
    try:
        return {w["id"].rsplit("-", 1)[-1]: w for w in _jobs(url)["workers"]}
    except OSError:
        return {}


def _until(predicate, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"up exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def test_up_supervises_its_workers_and_stops_them(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERLENS_") and k != "DATABASE_URL"}
    env |= {"ADAPTERLENS_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
            "ADAPTERLENS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--no-demo", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _until(lambda: {k for k, w in _workers(url).items() if w["alive"]} == {"interactive", "long"},
               "both workers", proc, log)
        workers = _workers(url)
        assert workers["interactive"]["kinds"] == "ablate, attribute, lens"
        assert workers["long"]["kinds"] == "all but ablate, attribute, lens"
        first = {name: w["pid"] for name, w in workers.items()}
        for pid in first.values():  # idle OpenMP threads spin briefly, then sleep (training/threads.py)
            environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                           if "=" in item)
            assert environ["GOMP_SPINCOUNT"] == "1000" and environ["OMP_NUM_THREADS"].isdigit()

        os.kill(first["long"], signal.SIGKILL)
        _until(lambda: _workers(url).get("long", {}).get("restarts") == 1 and _workers(url)["long"]["alive"],
               "the killed worker's restart", proc, log)
        long = _workers(url)["long"]
        assert long["pid"] != first["long"] and "SIGKILL" in long["note"]
        assert _workers(url)["interactive"]["pid"] == first["interactive"]  # the other was left alone
        page = urllib.request.urlopen(url + "/jobs", timeout=5).read().decode()
        assert "SIGKILL" in page and 'data-section="workers"' in page

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        pids = [_workers_pid for _workers_pid in (first["interactive"], long["pid"])]
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(p) for p in pids), "a worker outlived up (orphaned)"
        text = log.read_text()
        assert '"GET /api/jobs HTTP/1.1" 200' not in text  # request logs stay out of the terminal by default
        assert "[long]" in text and "[interactive]" in text  # the workers' own lines are relayed, labelled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
