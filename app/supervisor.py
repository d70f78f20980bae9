"""``adapterlens up``'s worker processes: started, watched, restarted with backoff, and stopped with ``up``.

Two classes of worker (design.md, "Interactive vs long work"): ``interactive`` claims only the kinds a person
waits for (:data:`app.db.queue.INTERACTIVE_KINDS`), ``long`` everything else, so a click on "ablate" never
waits for a training run. Each worker is a child process (``adapterlens worker``) in its own process group,
so a Ctrl-C in the terminal reaches ``up`` alone and ``up`` decides how its workers stop.

Threads: every child gets AdapterLens' OpenMP wait (training/threads.py: idle threads spin briefly, then sleep
instead of holding a core another process needs; benchmarks/threads.py measures it). With it, an idle worker costs
nothing, so the long workers share all the cores (the organism build, training and collection are what a
new user waits for, and they then compute with the thread count of ``adapterlens pipeline``, which the README's
figures were measured with: results depend on it at float rounding), and the interactive worker, idle most of
the time, gets a quarter of them (at least one): while it generates beside a long job the cores are briefly
oversubscribed, which the short spin keeps cheap. ``ADAPTERLENS_TORCH_THREADS`` sets one count for all.

Supervision: a worker that exits while ``up`` runs is restarted after a backoff (1 s, doubling to 60 s; back to
1 s once a worker has run for a minute). Before that, the jobs it held are failed at once (one attempt counted,
retried while attempts remain) instead of waiting for their lease, and its ``workers`` row says what happened
(``stopped``, ``note``); the restarted process registers under the same id with ``restarts`` counted, which
the jobs page shows. Stopping: SIGTERM to each worker (it finishes or releases its job), a second SIGTERM
after the grace period (release now), then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO

from app.db import queue
from app.db.session import make_engine, retry_while_down
from app.settings import Settings
from training.threads import thread_env

log = logging.getLogger(__name__)

RESTART_FIRST_S = 1.0  # seconds before the first restart of a worker that exited
RESTART_MAX_S = 60.0  # seconds between restarts at most (the wait doubles up to this)
STABLE_AFTER_S = 60.0  # seconds a worker must run for its backoff to start over
WATCH_INTERVAL_S = 0.5  # seconds between looks at the children
STOP_GRACE_S = 30.0  # seconds a stopping worker may take to finish or release its job before the second signal
KILL_AFTER_S = 10.0  # seconds after the second signal before SIGKILL
DB_GIVE_UP_S = 10.0  # seconds the supervisor waits for the database to record a worker's exit


@dataclass(frozen=True)
class WorkerSpec:
    """One supervised worker: its class name, what it claims, and its torch threads."""

    name: str
    kinds: tuple[str, ...] | None = None
    exclude_kinds: tuple[str, ...] | None = None
    threads: int | None = None


def worker_classes(n_interactive: int = 1, n_long: int = 1, cores: int | None = None,
                   threads: int | None = None) -> list[WorkerSpec]:
    """The workers ``up`` runs and their thread counts (see the module docstring)."""
    cores = cores or os.cpu_count() or 1
    interactive_threads = threads or max(1, cores // 4)
    long_threads = threads or max(1, cores // max(n_long, 1))
    specs = [WorkerSpec(f"interactive-{i + 1}" if n_interactive > 1 else "interactive",
                        kinds=tuple(queue.INTERACTIVE_KINDS), threads=interactive_threads)
             for i in range(n_interactive)]
    specs += [WorkerSpec(f"long-{i + 1}" if n_long > 1 else "long",
                         exclude_kinds=tuple(queue.INTERACTIVE_KINDS) if n_interactive else None,
                         threads=long_threads) for i in range(n_long)]
    return specs


@dataclass
class _Child:
    spec: WorkerSpec
    worker_id: str
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    delay: float = RESTART_FIRST_S  # the wait before the next restart
    restart_at: float | None = None
    note: str | None = None
    readers: list[threading.Thread] = field(default_factory=list)


class Supervisor:
    """Runs ``specs`` as worker processes until :meth:`stop`; ``emit`` receives their output lines."""

    def __init__(self, specs: Sequence[WorkerSpec], settings: Settings, *,
                 emit: Callable[[str], None] | None = None, worker_args: Sequence[str] = ()) -> None:
        self.settings = settings
        self.emit = emit or (lambda line: sys.stderr.write(line))
        self.worker_args = list(worker_args)
        prefix = f"{socket.gethostname()}-up{os.getpid()}"
        self.children = [_Child(spec, f"{prefix}-{spec.name}") for spec in specs]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._engine = make_engine(settings)

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._thread.start()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every worker (see the module docstring) and wait for them; safe to call twice."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
            for c in live:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for c in live:
                try:
                    c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("Worker %s still busy after %.0f s: asking it to release its job now",
                                c.spec.name, grace_s)
                    c.proc.send_signal(signal.SIGTERM)
                    try:
                        c.proc.wait(timeout=KILL_AFTER_S)
                    except subprocess.TimeoutExpired:
                        c.proc.kill()
                        c.proc.wait()
            for c in self.children:
                for reader in c.readers:
                    reader.join(timeout=2)
        self._engine.dispose()

    def hurry(self) -> None:
        """A second SIGTERM to every live worker: release the running job now instead of finishing it."""
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)

    # ---------------------------------------------------------------------------------------- spawn

    def _command(self, child: _Child) -> list[str]:
        spec = child.spec
        cmd = [sys.executable, "-m", "app.cli", "worker", "--worker-id", child.worker_id,
               "--parent-pid", str(os.getpid()), "--restarts", str(child.restarts), *self.worker_args]
        if spec.kinds:
            cmd += ["--kinds", ",".join(spec.kinds)]
        if spec.exclude_kinds:
            cmd += ["--exclude-kinds", ",".join(spec.exclude_kinds)]
        if child.note:
            cmd += ["--note", child.note]
        return cmd

    def child_env(self, child: _Child) -> dict[str, str]:
        """A worker's environment: ours, its class's torch threads and AdapterLens' OpenMP wait."""
        env = dict(thread_env(dict(os.environ), child.spec.threads))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TQDM_DISABLE", "1")  # progress bars would flood the terminal: `up` shows one line instead
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return env

    def _spawn(self, child: _Child) -> None:
        child.proc = subprocess.Popen(self._command(child), env=self.child_env(child), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
        child.started_at = time.monotonic()
        child.restart_at = None
        reader = threading.Thread(target=self._relay, args=(child.spec.name, child.proc.stdout),
                                  name=f"relay-{child.spec.name}", daemon=True)
        reader.start()
        child.readers = [r for r in child.readers if r.is_alive()] + [reader]
        log.info("Started worker %s (pid %d)", child.spec.name, child.proc.pid)

    def _relay(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            self.emit(f"[{name}] {line}")

    # ---------------------------------------------------------------------------------------- watch

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            with self._lock:
                if self._stop.is_set():
                    return
                for child in self.children:
                    self._check(child)

    def _check(self, child: _Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
            return
        if child.proc is None or child.proc.poll() is None:
            return
        code = child.proc.returncode
        ran = now - child.started_at
        if ran >= STABLE_AFTER_S:
            child.delay = RESTART_FIRST_S
        wait = child.delay
        child.delay = min(wait * 2, RESTART_MAX_S)
        child.restart_at = now + wait
        when = datetime.now().astimezone().strftime("%H:%M:%S")
        how = f"exit code {code}"
        if code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        child.note = f"restart {child.restarts + 1}: the previous process ended with {how} at {when}"
        log.warning("Worker %s ended with %s after %.0f s; restarting in %.0f s", child.spec.name, how, ran, wait)
        self._record_exit(child, how, when, wait)

    def _record_exit(self, child: _Child, how: str, when: str, wait: float) -> None:
        """Fail the dead worker's jobs now (not at lease expiry) and say so on its row; skipped if the database
        is down too (then the lease covers the jobs)."""
        reason = f"The worker process ended with {how} at {when} (seen by adapterlens up)."
        try:
            failed = retry_while_down(lambda: queue.fail_worker_jobs(self._engine, child.worker_id, reason),
                                      "recording a worker's exit", give_up_s=DB_GIVE_UP_S)
            retry_while_down(lambda: queue.worker_stopped(
                self._engine, child.worker_id, f"ended with {how} at {when}; restarting in {wait:.0f} s"),
                "recording a worker's exit", give_up_s=DB_GIVE_UP_S)
        except Exception as exc:  # noqa: BLE001 (supervision goes on without the record)
            log.warning("Could not record worker %s's exit (%s)", child.spec.name, type(exc).__name__)
            return
        if failed:
            log.warning("Jobs %s of worker %s failed this attempt (retried while attempts remain)",
                        ", ".join(map(str, failed)), child.spec.name)

    # ------------------------------------------------------------------------------------- queries

    def pids(self) -> dict[str, int | None]:
        return {c.spec.name: (c.proc.pid if c.proc is not None and c.proc.poll() is None else None)
                for c in self.children}
