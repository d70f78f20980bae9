"""How many CPU threads torch uses, and how its idle threads wait: chosen once per process, before torch runs.

On a machine whose cores other processes use too (another worker, the web server, a second study, anything),
torch's defaults are at their worst: one intra-op thread per core, and OpenMP threads that *spin* between
parallel regions (GNU OpenMP: 300,000 spins before sleeping). A spinning thread holds a core that the
competing process needs, and a parallel region ends only when its slowest thread, the one the kernel has just
descheduled, gets a core back; on 2 cores the organism's training step rate fell 10-45x beside one busy
process (issue 17). Two settings fix most of it:

- the wait: ``GOMP_SPINCOUNT=1000`` (GNU OpenMP, what torch's CPU wheels use) lets an idle thread spin only
  briefly before it sleeps, and ``KMP_BLOCKTIME=0`` (Intel OpenMP) makes it sleep at once. Sleeping at once
  in GNU OpenMP too (``OMP_WAIT_POLICY=PASSIVE``, what this module set before) keeps the rate beside a busy
  process about as well, but costs an idle machine 25-35% of its step rate (every parallel region then wakes
  its threads through the kernel): ``benchmarks/threads.py --configs torch-default adapterlens
  adapterlens-passive`` measures the three. OpenMP reads these when the library loads, i.e. at ``import
  torch``: :func:`prepare_process` must run before that, and a process spawning workers passes
  :func:`thread_env` to them (``adapterlens up``, app/supervisor.py);
- the thread count: :func:`choose_threads` takes the setting (``ADAPTERLENS_TORCH_THREADS``) when given, else
  the cores this process may run on (its CPU affinity, which containers narrow, not the host's count).

``benchmarks/threads.py`` measures both: the step rate alone and beside a busy process, in one run.

This module imports no torch at import time (``app/`` may import it; the web image has no torch).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

THREADS_ENV = "ADAPTERLENS_TORCH_THREADS"
# OpenMP's idle threads spin briefly, then sleep (GNU: spins before sleeping; Intel: KMP_BLOCKTIME, in ms).
WAIT_ENV: dict[str, str] = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
# Settings of a person's that choose the wait themselves: with one of them given, WAIT_ENV is not added.
EXPLICIT_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# The thread pools besides torch's own that a count applies to.
COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def choose_threads(setting: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """torch's intra-op thread count: ``setting`` if given, else ``ADAPTERLENS_TORCH_THREADS``, else every
    available core. A value that is not a positive integer is ignored (with a warning)."""
    if setting:
        return max(1, int(setting))
    raw = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
            if value >= 1:
                return value
        except ValueError:
            pass
        log.warning("%s=%r is not a positive integer: using every available core", THREADS_ENV, raw)
    return available_cores()


def thread_env(env: MutableMapping[str, str] | None = None, threads: int | None = None) -> MutableMapping[str, str]:
    """``env`` (default: a copy of this process's environment) with the short-spin wait (:data:`WAIT_ENV`),
    and with ``threads`` as every pool's count when given. Where ``env`` chooses a wait itself (any of
    :data:`EXPLICIT_WAIT`, e.g. ``OMP_WAIT_POLICY=PASSIVE``) nothing is added, since GNU OpenMP lets
    ``GOMP_SPINCOUNT`` override the policy; a given count replaces the inherited one."""
    env = dict(os.environ) if env is None else env
    if not any(key in env for key in EXPLICIT_WAIT):
        env.update(WAIT_ENV)
    if threads:
        env[THREADS_ENV] = str(threads)
        for var in COUNT_VARS:
            env[var] = str(threads)
    return env


def prepare_process(threads: int | None = None) -> bool:
    """Put the wait setting (and ``threads``, when given) into this process's environment, for the OpenMP
    runtime that ``import torch`` loads. Returns False (and changes nothing) once torch is imported: then
    the runtime has read its settings already; :func:`configure_torch` still sets the count."""
    if "torch" in sys.modules:
        return False
    thread_env(os.environ, threads)
    return True


def wait_setting(env: Mapping[str, str] | None = None) -> str:
    """The OpenMP wait settings in ``env`` (default: this process's), as ``KEY=value`` pairs, for logs."""
    env = os.environ if env is None else env
    return " ".join(f"{k}={env[k]}" for k in EXPLICIT_WAIT if k in env) or "OpenMP's default"


def configure_torch(setting: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`choose_threads` (and one inter-op thread); returns the count.
    Call it once, early, in a process that runs models (the worker, the CLI's foreground jobs)."""
    n = choose_threads(setting)
    prepare_process(n)
    for var in COUNT_VARS:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass
    log.info("torch threads: %d (OpenMP wait: %s)", n, wait_setting())
    return n
