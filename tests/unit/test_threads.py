"""training/threads.py: the thread count and AdapterLens' OpenMP wait (a short spin), in this process and in the
processes that the CLI and ``adapterlens up`` start (issue 17; benchmarks/threads.py measures the effect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app.settings import Settings
from app.supervisor import Supervisor, WorkerSpec, worker_classes
from training.threads import EXPLICIT_WAIT, available_cores, choose_threads, prepare_process, thread_env

ROOT = Path(__file__).resolve().parents[2]


def test_choose_threads_prefers_the_setting_then_the_environment_then_the_available_cores():
    assert choose_threads(3, env={"ADAPTERLENS_TORCH_THREADS": "5"}) == 3
    assert choose_threads(None, env={"ADAPTERLENS_TORCH_THREADS": "5"}) == 5
    assert choose_threads(None, env={}) == available_cores() == len(os.sched_getaffinity(0))
    for bad in ("zero", "0", "-2", " "):
        assert choose_threads(None, env={"ADAPTERLENS_TORCH_THREADS": bad}) == available_cores()


def test_thread_env_adds_the_short_spin_and_the_count_but_keeps_an_explicit_wait_policy():
    env = thread_env({"PATH": "/bin", "OMP_NUM_THREADS": "8"}, 2)
    assert env["GOMP_SPINCOUNT"] == "1000" and env["KMP_BLOCKTIME"] == "0" and "OMP_WAIT_POLICY" not in env
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["ADAPTERLENS_TORCH_THREADS"] == "2"
    assert env["PATH"] == "/bin"
    kept = thread_env({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "8"})
    assert kept["OMP_WAIT_POLICY"] == "ACTIVE" and kept["OMP_NUM_THREADS"] == "8"  # no count given: inherited
    assert "GOMP_SPINCOUNT" not in kept  # GNU OpenMP would let it override the person's policy
    assert thread_env({"GOMP_SPINCOUNT": "5"})["GOMP_SPINCOUNT"] == "5"


def test_prepare_process_changes_nothing_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401 (the tests import it anyway)

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert prepare_process(2) is False
    assert "GOMP_SPINCOUNT" not in os.environ


def _child_report(env: dict[str, str], code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_torch_in_a_fresh_process_sets_the_wait_before_torch_loads_and_the_count():
    env = {k: v for k, v in os.environ.items() if k not in EXPLICIT_WAIT and not k.endswith("_NUM_THREADS")}
    env |= {"PYTHONPATH": str(ROOT), "ADAPTERLENS_TORCH_THREADS": "1"}
    code = ("import json, os, sys\n"
            "from training.threads import configure_torch\n"
            "n = configure_torch()\n"
            "import torch\n"
            "print(json.dumps({'n': n, 'torch': torch.get_num_threads(), 'wait': os.environ.get('GOMP_SPINCOUNT'),"
            " 'blocktime': os.environ.get('KMP_BLOCKTIME'), 'omp': os.environ.get('OMP_NUM_THREADS')}))")
    assert _child_report(env, code) == {"n": 1, "torch": 1, "wait": "1000", "blocktime": "0", "omp": "1"}


def test_the_cli_sets_the_wait_policy_before_a_command_imports_torch():
    env = {k: v for k, v in os.environ.items() if k not in EXPLICIT_WAIT}
    env |= {"PYTHONPATH": str(ROOT)}
    code = ("import json, os, sys\n"
            "from typer.testing import CliRunner\n"
            "from app.cli import app\n"
            "CliRunner().invoke(app, ['db', '--help'])\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'wait': os.environ.get('GOMP_SPINCOUNT')}))")
    assert _child_report(env, code) == {"torch": False, "wait": "1000"}


def test_up_gives_each_worker_the_short_spin_and_its_class_thread_count(tmp_path):
    """The environment Supervisor passes to its children (what /proc/PID/environ of a worker shows)."""
    settings = Settings(data_dir=tmp_path)
    specs = worker_classes(1, 1, cores=8)
    assert [s.threads for s in specs] == [2, 8]  # the long worker computes as `adapterlens pipeline` does
    assert [s.threads for s in worker_classes(1, 1, cores=2)] == [1, 2]
    assert [s.threads for s in worker_classes(1, 2, cores=8)] == [2, 4, 4]
    sup = Supervisor([*specs, WorkerSpec("plain")], settings)
    try:
        envs = {c.spec.name: sup.child_env(c) for c in sup.children}
    finally:
        sup._engine.dispose()
    for name, threads in (("interactive", "2"), ("long", "8")):
        assert envs[name]["GOMP_SPINCOUNT"] == "1000" and envs[name]["KMP_BLOCKTIME"] == "0"
        assert envs[name]["OMP_NUM_THREADS"] == envs[name]["ADAPTERLENS_TORCH_THREADS"] == threads
    assert envs["plain"]["GOMP_SPINCOUNT"] == "1000"
