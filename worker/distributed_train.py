"""What each torchrun rank runs: ``torchrun --standalone --nproc_per_node N -m worker.distributed_train SPEC``.

``SPEC`` is a JSON file the ``train`` job writes (:func:`worker.train_launch.write_spec`): the run (name,
model specs, config), the data directory and whether to resume. The ranks need no database: each loads
the pair onto its own device (``cuda:{LOCAL_RANK}``, or the CPU), builds the same training data and calls
:func:`training.trainer.train`, which does the data-parallel part. Rank 0 appends each step's metrics (and the step total) to
the spec's ``progress_path`` (the job tails it into the database) and writes ``result_path`` at the end.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)


def run_spec(spec: dict) -> dict:
    """Train the spec's run on this rank; the train result as JSON-able values (the same on every rank)."""
    from app.db.schema import Run
    from app.settings import get_settings
    from training.config import train_config_from_dict
    from training.distributed import init_from_env
    from training.trainer import total_steps, train
    from worker.models_cache import load_run_model
    from worker.pipeline import training_data

    dp, device = init_from_env(device=spec.get("device", "auto"))
    settings = get_settings(data_dir=spec["data_dir"])
    run = Run(name=spec["run"]["name"], base_model=spec["run"]["base_model"],
              target_model=spec["run"]["target_model"], config=spec["run"]["config"])
    cfg = train_config_from_dict((run.config or {}).get("train") or {})
    model, tokenizer = load_run_model(settings, run.base_model, run.target_model, None,
                                      adapter_cfg={**cfg.adapter.__dict__}, device=str(device))
    data = training_data(run, tokenizer, settings)
    main = dp is None or dp.is_main
    progress_path = Path(spec["progress_path"]) if spec.get("progress_path") else None

    n_total = total_steps(cfg, len(data))

    def on_step(metrics: dict) -> None:
        if progress_path is not None:
            with progress_path.open("a") as fh:
                fh.write(json.dumps({"total": n_total, "metrics": metrics}) + "\n")

    result = train(cfg, model, data, run_dir=Path(spec["run_dir"]), on_step=on_step if main else None,
                   resume=bool(spec.get("resume", True)), progress=False, base_name=run.base_model,
                   target_name=run.target_model)
    out = {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
           "checkpoint": str(result.checkpoint_dir), "final": result.final,
           "world_size": 1 if dp is None else dp.world_size}
    if main and spec.get("result_path"):
        Path(spec["result_path"]).write_text(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun --standalone --nproc_per_node N -m worker.distributed_train SPEC.json",  # noqa: T201
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_spec(json.loads(Path(args[0]).read_text()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
