"""The ``train`` job's multi-process path: launch torchrun, stream its progress, surface its failure.

With ``nproc`` > 1 the job does not train in its own process: it writes a spec next to the run's
checkpoints, runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m
worker.distributed_train SPEC`` (``torchrun``'s own module, so it is the same Python and torch as the
worker) and tails the progress file rank 0 appends to, handing each step's metrics to the job's
``on_step`` (database rows, progress, cancellation). A failed rank makes torchrun stop the others and exit
non-zero; the job then fails with the tail of torchrun's log, where the rank's traceback is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SPEC_FILE = "torchrun-spec.json"
PROGRESS_FILE = "torchrun-progress.jsonl"
RESULT_FILE = "torchrun-result.json"
LOG_FILE = "torchrun.log"
ENTRY_MODULE = "worker.distributed_train"
POLL_S = 0.5
ERROR_TAIL_CHARS = 4000


class DistributedTrainError(RuntimeError):
    """torchrun exited non-zero; the message ends with the tail of its log (the failing rank's traceback)."""


def torchrun_command(spec_path: Path, nproc: int) -> list[str]:
    """The launch command: torchrun (as ``python -m torch.distributed.run``) on one node, ``nproc`` ranks."""
    if nproc < 1:
        raise ValueError(f"nproc must be ≥ 1, not {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", ENTRY_MODULE, str(spec_path)]


def write_spec(run_dir: Path, *, run: dict, data_dir: str | Path, device: str, resume: bool) -> Path:
    """The spec the ranks read (run name, model specs and config, data dir); fresh progress/result files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (PROGRESS_FILE, RESULT_FILE):
        (run_dir / name).unlink(missing_ok=True)
    spec = {"run": run, "data_dir": str(data_dir), "device": device, "resume": resume, "run_dir": str(run_dir),
            "progress_path": str(run_dir / PROGRESS_FILE), "result_path": str(run_dir / RESULT_FILE)}
    path = run_dir / SPEC_FILE
    path.write_text(json.dumps(spec, indent=1))
    return path


class _Tail:
    """Complete JSON lines appended to a file since the last read (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending = path, 0, b""

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        self.offset += len(chunk)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def run_torchrun(run_dir: Path, nproc: int, *, on_step: Callable[[dict, int], None] | None = None,
                 env: dict[str, str] | None = None) -> dict:
    """Run the spec in ``run_dir`` on ``nproc`` ranks; rank 0's result dict.

    ``on_step(metrics, total_steps)`` gets every step's metrics as rank 0 writes them; if it raises (e.g. the job was
    cancelled), torchrun is terminated (it stops its ranks; the last checkpoint is kept) and the
    exception propagates. A non-zero exit raises :class:`DistributedTrainError` with the log's tail.
    """
    log_path = run_dir / LOG_FILE
    tail = _Tail(run_dir / PROGRESS_FILE)
    with log_path.open("wb") as log_fh:
        proc = subprocess.Popen(torchrun_command(run_dir / SPEC_FILE, nproc), stdout=log_fh,
                                stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                done = proc.poll() is not None
                for line in tail.read():
                    if on_step is not None:
                        on_step(line["metrics"], line["total"])
                if done:
                    break
                time.sleep(POLL_S)
        except BaseException:
            _stop(proc)
            raise
    if proc.returncode != 0:
        text = log_path.read_text(errors="replace")
        raise DistributedTrainError(f"torchrun ({nproc} processes) exited with status {proc.returncode}; "
                                    f"log {log_path}, last lines:\n{text[-ERROR_TAIL_CHARS:]}")
    return json.loads((run_dir / RESULT_FILE).read_text())


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM torchrun (it forwards the signal to its ranks), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
