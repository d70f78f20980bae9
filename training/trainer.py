"""The training loop: AdamW on the adapters only, warm-up + cosine, clipping, checkpoints, metrics.

Reads top to bottom like nanoGPT's ``train.py``: seed, build optimiser and schedule, resume if a checkpoint
is there, then per step: draw the bridging cutoff, fused forward (:func:`training.step.fused_step`), one
backward, clip, step, log, checkpoint on an interval. Metrics go to ``<run_dir>/metrics.jsonl`` (one JSON
object per step) and to the caller's ``on_step`` callback (the ``train`` job writes them to the database).

Checkpoint layout (``<run_dir>/checkpoint/``): ``adapters.safetensors`` + ``adapter_config.json``
(:func:`training.checkpoint.save_adapters`, loadable by ``load_adapters``) and ``trainer_state.pt``
(optimizer, scheduler, step, RNG states, data position, dead-feature counters and the TrainConfig used).

Data parallel: when ``torch.distributed`` is initialised with several ranks (``torchrun``, see
:mod:`training.distributed` and ``worker.distributed_train``), each rank runs this same loop on its slice
of the same global batch; gradients and metrics are summed across ranks, so the run equals a
single-process run on the whole batch. Only rank 0 writes metrics, checkpoints and progress and calls
``on_step``; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.adapter import AdapterModel
from training.checkpoint import load_adapters, save_adapters
from training.config import TrainConfig, train_config_from_dict, train_config_to_dict
from training.data import TokenDataset, as_dataset, batches_per_epoch, iterate_batches
from training.distributed import DataParallel
from training.precision import fp32_attention, resolve_precision
from training.step import StepResult, fused_step

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"

OnStep = Callable[[dict], None]


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint_dir: Path  # adapters of the final step (load with training.checkpoint.load_adapters)
    steps: int  # optimizer steps done in all (including those before a resume)
    tokens: int  # real tokens trained on in all
    seconds: float  # wall time of this call
    resumed_from: int | None  # step of the checkpoint this call started from
    final: dict = field(default_factory=dict)  # metrics of the last step


# -- schedule ----------------------------------------------------------------------------------------------

def total_steps(cfg: TrainConfig, n_sequences: int) -> int:
    """``max_steps`` when set (looping over the data as often as needed), else ``epochs`` passes."""
    return cfg.max_steps or cfg.epochs * batches_per_epoch(n_sequences, cfg.batch_size)


def lr_factor(step: int, total: int, warmup_frac: float, min_frac: float) -> float:
    """Multiplier of the peak lr at (0-based) ``step``: linear warm-up, then cosine down to ``min_frac``."""
    warmup = math.ceil(warmup_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- metrics ------------------------------------------------------------------------------------------------

class DeadFeatures:
    """Which features fired in none of the last N sequences (N per window), counted per layer."""

    def __init__(self, n_layers: int, n_features: int, windows: Sequence[int]):
        self.windows = tuple(windows)
        self.seen = 0  # sequences so far
        self.last_fired = torch.zeros(n_layers, n_features, dtype=torch.long)  # sequence count at last firing

    def update(self, fired: torch.Tensor, n_sequences: int) -> None:
        """``fired`` [L, F] bool: fired somewhere in this batch (batch granularity, exact with batch 1)."""
        self.seen += n_sequences
        self.last_fired[fired.cpu()] = self.seen

    def counts(self) -> dict[str, int | list[int] | None]:
        out: dict[str, int | list[int] | None] = {}
        for w in self.windows:
            if self.seen < w:  # not enough history to call anything dead
                out[f"dead_{w}"], out[f"dead_{w}_layers"] = None, None
                continue
            per_layer = ((self.seen - self.last_fired) >= w).sum(-1).tolist()
            out[f"dead_{w}"], out[f"dead_{w}_layers"] = int(sum(per_layer)), per_layer
        return out

    def state_dict(self) -> dict:
        return {"seen": self.seen, "last_fired": self.last_fired.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.last_fired = state["last_fired"].clone()


class JsonlWriter:
    """Appends one JSON object per step to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (written before a crash, redone after the resume)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def __call__(self, metrics: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")


def step_metrics(res: StepResult, *, step: int, epoch: int, lr: float, grad_norm: float, tokens: int,
                 tokens_per_s: float, dead: DeadFeatures) -> dict:
    """The per-step record: terms, per-layer L0 and NMSE, bridging per direction with its cutoff, dead counts."""
    terms = res.terms()
    return {
        "step": step, "epoch": epoch, "lr": lr, **terms,
        "l0": float(res.l0_layers.mean()), "l0_layers": [round(v, 4) for v in res.l0_layers.tolist()],
        "nmse_points": [float(v) for v in res.nmse_points.tolist()],  # [0] embeddings, [i] after block i-1
        "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens_per_s,
        **dead.counts(),
    }


# -- checkpoints ----------------------------------------------------------------------------------------------

def _rng_state(cutoff_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "cutoff": cutoff_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, cutoff_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cutoff_gen.set_state(state["cutoff"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: AdapterModel, state: dict, *, base_name: str, target_name: str) -> Path:
    """Write into ``checkpoint.tmp`` and swap it in, so a kill mid-write leaves the previous checkpoint whole."""
    final, tmp, old = run_dir / CHECKPOINT_DIR, run_dir / f"{CHECKPOINT_DIR}.tmp", run_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapters(model, tmp, base_name=base_name, target_name=target_name,
                  extra={"step": state["step"], "train_config": state["config"]})
    torch.save(state, tmp / TRAINER_STATE_FILE)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (``checkpoint``, else ``checkpoint.old`` left by a kill)."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (run_dir / name / TRAINER_STATE_FILE).is_file():
            return run_dir / name
    return None


# -- the loop -------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, model: AdapterModel, data: TokenDataset | Sequence[Sequence[int]], *,
          run_dir: str | Path, on_step: OnStep | None = None, resume: bool = True, progress: bool = True,
          base_name: str | None = None, target_name: str | None = None) -> TrainResult:
    """Train ``model``'s adapters on ``data`` with ``cfg``; checkpoints and ``metrics.jsonl`` go in ``run_dir``.

    ``on_step(metrics)`` is called after every step (besides the JSONL writer). ``resume``: continue from
    ``run_dir``'s checkpoint when there is one (the next step is then identical to an uninterrupted run's).
    ``base_name``/``target_name`` are recorded in the adapter checkpoint (default: the HF configs' names).
    Under ``torch.distributed`` with several ranks every rank calls this with the same arguments (data
    parallel, see the module docstring); the returned result is the same on every rank.
    """
    t_start = time.perf_counter()
    dp = DataParallel.current()
    main = dp is None or dp.is_main
    dataset = as_dataset(data)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if model.cfg.n_features != cfg.adapter.n_features or model.cfg.backbone != cfg.adapter.backbone:
        raise ValueError(f"the model's adapters ({model.cfg}) do not match the training config ({cfg.adapter})")
    base_name = base_name or _model_name(model.hf if model.target_hf is not None else None, "base")
    target_name = target_name or _model_name(model.target_hf or model.hf, "target")
    L, F = model.n_layers, model.n_features
    device = next(model.adapter_parameters()).device
    n_total = total_steps(cfg, len(dataset))

    # Seed everything this run draws from: torch (nothing else here, but user code in callbacks), python
    # random, the data order (a function of seed and epoch) and the bridging cutoffs (their own generator).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    cutoff_gen = torch.Generator().manual_seed(cfg.seed + 1)

    params = list(model.adapter_parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, n_total, cfg.warmup_frac, cfg.min_lr_frac))
    dead = DeadFeatures(L, F, cfg.dead_windows)
    step, tokens, epoch, index = 0, 0, 0, 0
    resumed_from = None
    writer = JsonlWriter(run_dir / METRICS_FILE)
    if dp is not None:
        dp.check_same("dataset size, tokens, seed and batch size",
                      [len(dataset), dataset.n_tokens, cfg.seed, cfg.batch_size, n_total])
        if cfg.batch_size < dp.world_size:
            log.warning("batch_size %d < %d processes: %d of them have no rows in any step (raise batch_size to "
                        "at least the number of processes)", cfg.batch_size, dp.world_size,
                        dp.world_size - cfg.batch_size)

    ckpt = find_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = torch.load(ckpt / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
        _warn_config_change(train_config_from_dict(state["config"]), cfg)
        load_adapters(model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], cutoff_gen)
        dead.load_state_dict(state["dead"])
        step, tokens, epoch, index = state["step"], state["tokens"], state["epoch"], state["index"]
        resumed_from = step
        if main:
            writer.truncate_after(step)
        log.info("resumed %s at step %d of %d", run_dir, step, n_total)
    else:
        # A fresh start begins from the seed's adapter init, not from whatever the process drew before.
        model.reset_adapters(cfg.seed)
        if main:
            writer.truncate_after(0)  # lines of an earlier attempt would duplicate steps
    if dp is not None:
        dp.broadcast_parameters(params)  # ranks start identical (and stay so: same summed gradients)

    def checkpoint() -> Path:
        state = {"step": step, "tokens": tokens, "epoch": epoch, "index": index,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": _rng_state(cutoff_gen), "dead": dead.state_dict(), "config": train_config_to_dict(cfg)}
        return save_checkpoint(run_dir, model, state, base_name=base_name, target_name=target_name)

    model.eval()  # frozen weights; no dropout anywhere in the step
    precision = resolve_precision(cfg.precision, device)  # "auto": bf16 where the device has it natively
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    slow_bf16_attention = precision == "bf16" and device.type == "cpu"  # training/precision.py says why
    attention = contextlib.ExitStack()  # entered inside the try below, closed in its finally
    batches = iterate_batches(dataset, cfg.batch_size, seed=cfg.seed, max_len=cfg.max_seq_len,
                              start_epoch=epoch, start_index=index)
    metrics: dict = {}
    log.info("training %d layers × %d features for %d steps (%d sequences, batch %d, %s)",
             L, F, n_total, len(dataset), cfg.batch_size, precision)
    bar = tqdm(total=n_total, initial=step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    try:
        for hf in (model.hf, model.target_hf):
            if hf is not None:
                attention.enter_context(fp32_attention(hf, enabled=slow_bf16_attention))
        while step < n_total:
            t0 = time.perf_counter()
            batch = next(batches)
            ids, mask, active = batch.input_ids, batch.attention_mask, True
            if dp is not None:  # this rank's rows; the terms below are its shares of the global batch's
                ids, mask, active = dp.local_rows(ids, mask)
            ids, mask = ids.to(device), mask.to(device)
            # one cutoff k ∈ {0..L} per step, from the run's own generator (saved with the checkpoint)
            cutoff = int(torch.randint(0, L + 1, (1,), generator=cutoff_gen))
            with autocast:
                res = fused_step(model, ids, mask, weights=cfg.loss, cutoff=cutoff, kl_chunk=cfg.kl_chunk,
                                 all_sum=None if dp is None else dp.all_sum(active),
                                 recompute=cfg.activation_checkpointing)
            if active:
                res.loss.backward()
            if dp is not None:
                dp.sum_gradients(params, active)
                res = dp.reduce_result(res, active)
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            tokens += res.n_tokens
            epoch, index = (batch.epoch, batch.index + 1)  # position of the *next* batch
            dead.update(res.fired, batch.input_ids.shape[0])
            dt = time.perf_counter() - t0
            metrics = step_metrics(res, step=step, epoch=batch.epoch, lr=lr, grad_norm=grad_norm, tokens=tokens,
                                   tokens_per_s=res.n_tokens / dt if dt > 0 else 0.0, dead=dead)
            if not main:
                continue
            writer(metrics)
            if on_step is not None:
                on_step(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}", l0=f"{metrics['l0']:.1f}")
            if step % cfg.checkpoint_every == 0 or step == n_total:
                checkpoint()
    except KeyboardInterrupt:
        log.warning("interrupted at step %d; the last checkpoint is kept (resume continues from it)", step)
        raise
    finally:
        bar.close()
        attention.close()
    final_dir = None
    if main:
        final_dir = find_checkpoint(run_dir) or checkpoint()  # n_total reached before this call: nothing to do
    if dp is not None:
        dp.barrier()  # rank 0's last checkpoint is on disk before the other ranks look for it
        final_dir = final_dir or find_checkpoint(run_dir)
    seconds = time.perf_counter() - t_start
    log.info("trained %d steps (%d tokens) in %.1f s; adapters in %s", step, tokens, seconds, final_dir)
    return TrainResult(run_dir=run_dir, checkpoint_dir=final_dir, steps=step, tokens=tokens, seconds=seconds,
                       resumed_from=resumed_from, final=metrics)


def _model_name(hf, fallback: str) -> str:
    name = getattr(getattr(hf, "config", None), "_name_or_path", "") if hf is not None else ""
    return str(name) or fallback


def _warn_config_change(saved: TrainConfig, cfg: TrainConfig) -> None:
    old, new = train_config_to_dict(saved), train_config_to_dict(cfg)
    changed = sorted(k for k in new if old.get(k) != new[k])
    if changed:
        log.warning("resuming with a changed training config (%s); the run will not match an uninterrupted one",
                    ", ".join(changed))
