"""benchmarks/gpu.py's smoke mode: the same four measurements at toy shapes on the CPU, in seconds (the real run
needs a CUDA device; this keeps its code working where there is none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the dtype of the real (CUDA) run
def test_the_gpu_benchmark_runs_every_section_at_toy_shapes_on_the_cpu(tmp_path, dtype):
    out = tmp_path / "gpu.json"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--dtype", dtype, "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    name = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[dtype]
    assert r["device"] == {"name": "cpu", "dtype": name, "tiny": True}
    train, attr, coll, abl = r["train"], r["attribute"], r["collect"], r["ablate"]
    assert train["step_over_plain"] > 1 and train["plan_gb"] > 0 and train["peak_step_gb"] is None
    assert attr["graph_s"] > 0 and 0 < attr["feature_nodes"] <= 40 and attr["active_features"] > 0
    assert coll["tokens"] >= 512 and coll["collect_tokens_per_s"] > 0 and coll["bare_tokens_per_s"] > 0
    assert abl["generate_tokens_per_s"] > 0 and abl["ablate_job_tokens_per_s"] > 0
    for line in ("train:", "attribute:", "collect:", "ablate:", "total"):
        assert line in proc.stdout


def test_without_cuda_the_full_run_says_how_to_smoke_test():
    env = {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--only", "collect"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--device cpu --tiny" in proc.stderr
