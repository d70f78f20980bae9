"""Data-parallel adapter training over ``torch.distributed`` (one process per GPU, launched by torchrun).

Every rank holds the whole adapter model (both frozen models + adapters) and draws the *same* global batch
from an identically seeded iterator; it keeps rows ``rank::world_size`` and runs the fused step on them
with :func:`training.step.fused_step`'s ``all_sum`` hook, so its loss is its share of the global batch's
loss (means over real tokens and NMSE ratios are normalised by global totals). Summing the adapter
gradients over the ranks then gives exactly the gradient of a single-process step on the whole batch,
so the optimiser, clipping and schedule stay identical on every rank and need no communication.

Why data parallel and not FSDP: the frozen models are read-only and the same on every rank, and the fused
step calls their submodules directly (not through one ``forward``), which FSDP/DDP wrappers expect.
Plain collectives (``all_reduce`` of gradients and metrics) are all the synchronisation it needs.

Process group: :func:`init_from_env` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and picks
``cuda:{LOCAL_RANK}`` with NCCL when CUDA is present, else the CPU with gloo (how the tests run it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from training.step import AllSum, StepResult

log = logging.getLogger(__name__)


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> tuple[DataParallel | None, torch.device]:
    """Join the process group torchrun describes in the environment; (None, device) without torchrun.

    The device is ``cuda:{LOCAL_RANK}`` when CUDA is available (set as the current device, as NCCL needs)
    unless ``device`` is ``cpu``; else the CPU. The backend follows it (nccl / gloo).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return None, dev
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return DataParallel.current(), dev


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the default process group, and the collectives training needs."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> DataParallel | None:
        """The group when ``torch.distributed`` is initialised with more than one rank, else None."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, checkpoints and the progress bar, and calls ``on_step``."""
        return self.rank == 0

    def local_rows(self, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(ids, mask, active): rows ``rank::world_size`` of the global batch, trailing pad columns cut.

        A batch with fewer rows than ranks (a small last batch of an epoch) leaves some ranks without rows;
        they still run the step — on row 0 as a stand-in, so that they take part in the same collectives —
        with ``active`` False, and contribute nothing to sums, gradients or fired masks.
        """
        active = self.rank < input_ids.shape[0]
        rows = slice(self.rank, None, self.world_size) if active else slice(0, 1)
        ids, mask = input_ids[rows], attention_mask[rows]
        width = max(int(mask.sum(1).max()), 1)  # right padding: columns past the longest kept row are all pad
        return ids[:, :width], mask[:, :width], active

    def all_sum(self, active: bool) -> AllSum:
        """The ``all_sum`` hook for :func:`training.step.fused_step`; an inactive rank adds zeros."""
        def reduce(t: torch.Tensor) -> torch.Tensor:
            if not active:
                t = torch.zeros_like(t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        return reduce

    def sum_gradients(self, params: list[torch.nn.Parameter], active: bool) -> None:
        """Sum the ranks' gradients in place (each holds its share, so the sum is the global gradient)."""
        handles = []
        for p in params:
            if p.grad is None or not active:
                p.grad = torch.zeros_like(p)
            handles.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
        for h in handles:
            h.wait()

    def reduce_result(self, res: StepResult, active: bool) -> StepResult:
        """The global batch's step result on every rank: shares summed, fired masks OR-ed, tokens added."""
        names = ("loss", "kl", "lm", "nmse", "l1", "bridge_a2t", "bridge_t2a")
        scalars = [getattr(res, n) for n in names]
        device = res.loss.device
        packed = torch.cat([
            torch.stack([torch.zeros((), dtype=torch.float64, device=device) if v is None else v.detach().double() for v in scalars]),
            torch.tensor([float(res.n_tokens)], dtype=torch.float64, device=device),
            res.nmse_points.detach().double(), res.l0_layers.detach().double(),
        ])
        fired = res.fired.to(torch.int32)
        if not active:
            packed.zero_()
            fired.zero_()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        n_points = res.nmse_points.numel()
        values = dict(zip(names, packed[:len(names)], strict=True))
        rest = packed[len(names) + 1:]
        out = {n: None if getattr(res, n) is None else v.to(getattr(res, n).dtype) for n, v in values.items()}
        return StepResult(**out, cutoff=res.cutoff,
                          nmse_points=rest[:n_points].to(res.nmse_points.dtype),
                          l0_layers=rest[n_points:].to(res.l0_layers.dtype),
                          fired=fired.bool(), n_tokens=int(round(float(packed[len(names)]))))

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's adapters (a model built with another seed would drift apart)."""
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def check_same(self, what: str, values: list[float]) -> None:
        """Fail on every rank when the ranks disagree on ``values`` (e.g. dataset size, seed, batch size)."""
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        lo, hi = t.clone(), t.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"data-parallel ranks disagree on {what}: min {lo.tolist()} max {hi.tolist()} "
                               f"(rank {self.rank} has {values}); every rank must load the same data and config")

    def barrier(self) -> None:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where small bookkeeping tensors live: NCCL only reduces CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
