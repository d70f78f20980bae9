"""Runs and the demo pipeline, without torch: used by ``adapterlens up``, compose's first start and the CLI.

The demo pipeline is the embedded default: build the organism → train adapters → collect
features → evaluate → hesitation study, queued as jobs that each wait for the previous one. It is
queued only when the database has no run, so a second ``up`` reuses everything (and each handler
reuses what is on disk: the cached organism, the final checkpoint).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db import queue
from app.db.schema import Run
from app.db.session import make_sessionmaker
from training.config import preset, train_config_to_dict

log = logging.getLogger(__name__)

ORGANISM_PREFIX = "organism:"
DEMO_STEPS = ("organism", "train", "collect", "evaluate", "hesitation")  # collect first: the feature pages sooner
PIPELINE_PRIORITY = 0  # batch work; interactive ablations use a higher priority


def organism_spec(preset_name: str, seed: int) -> str:
    """The model spec of a built organism (resolved inside the data directory by the worker)."""
    return f"{ORGANISM_PREFIX}{preset_name}:s{seed}"


def organism_run_name(preset_name: str, seed: int, train_preset: str) -> str:
    return f"{preset_name}-s{seed}-{train_preset}"


def ensure_run(session: Session, *, name: str, base_model: str, target_model: str, config: dict[str, Any]) -> int:
    """The id of run ``name``, created (status ``created``) when missing; an existing run is left as it is."""
    run = session.scalar(select(Run).where(Run.name == name))
    if run is None:
        run = Run(name=name, base_model=base_model, target_model=target_model, config=config, status="created")
        session.add(run)
        session.flush()
    return run.id


def has_runs(engine: Engine) -> bool:
    with make_sessionmaker(engine)() as s:
        return s.scalar(select(Run.id).limit(1)) is not None


def enqueue_demo_pipeline(engine: Engine, *, organism_preset: str = "organism", train_preset: str = "organism",
                          seed: int = 0, steps: tuple[str, ...] = DEMO_STEPS) -> dict[str, int]:
    """Create the organism run and queue the pipeline's jobs in order; returns {step: job id}."""
    spec = organism_spec(organism_preset, seed)
    config = {"train": train_config_to_dict(preset(train_preset)), "data": {"kind": "organism"},
              "preset": train_preset}
    jobs: dict[str, int] = {}
    # one transaction: the run and all its jobs exist together or not at all (a crash half-way would
    # otherwise leave a run that makes the next start believe the pipeline was queued)
    with make_sessionmaker(engine)() as s, s.begin():
        run_id = ensure_run(s, name=organism_run_name(organism_preset, seed, train_preset), base_model=spec,
                            target_model=spec, config=config)
        payloads = {"organism": {"preset": organism_preset, "seed": seed}, "train": {"run_id": run_id},
                    "collect": {"run_id": run_id}, "evaluate": {"run_id": run_id}, "hesitation": {"run_id": run_id}}
        previous = None
        for step in steps:
            previous = queue.enqueue(s, step, payloads[step], priority=PIPELINE_PRIORITY, depends_on=previous,
                                     run_id=run_id if step != "organism" else None)
            jobs[step] = previous
    log.info("queued the demo pipeline for run %d: %s", run_id, jobs)
    return jobs
