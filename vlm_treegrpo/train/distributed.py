"""Data parallelism: one process per device, each sampling and scoring its share of a step's
prompts, with the gradients summed across processes before every optimizer step.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address)::

    torchrun --nproc_per_node 8 -m vlm_treegrpo.cli train --config configs/demo-smollm2.yaml

A prompt's whole tree (its K thoughts and K x M leaves) lives on one process, so the
group-relative advantages need nothing from the others. What does cross processes is the
loss's normalizers (a step's token and row counts, its packed width) and the gradients: each
process weights its micro-batches by the *step's* totals and the gradients are summed, so the
update is the one a single process makes on all the step's prompts (``tests/test_distributed.py``
checks this to float64 precision). Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every
method here is a no-op and no process group is made.

The collectives run on the process's device: NCCL on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

RANK_SEED = 7919
"""Process ``r`` samples with ``seed + RANK_SEED * r`` (:meth:`Dist.seed`)."""

BUCKET_ELEMENTS = 2**24
"""Gradients are summed in flat buckets of at most this many elements (64 MB in fp32)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes, collectives on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes logs, samples and the checkpoint."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def seed(self, base: int) -> int:
        """This process's sampling seed: ``base`` for process 0 (the one-process stream), and a
        distinct one for each other process."""
        return base + RANK_SEED * self.rank

    def shard(self, items: Sequence) -> list:
        """This process's contiguous share of ``items`` (whose length ``world`` divides)."""
        if len(items) % self.world:
            raise ValueError(f"distributed: {len(items)} items do not split over {self.world} processes")
        n = len(items) // self.world
        return list(items[self.rank * n : (self.rank + 1) * n])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        """Each value's maximum over the processes."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: Sequence[float], op) -> list[float]:
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_grads(self, params: Iterable[Tensor]) -> None:
        """Replace every parameter's gradient by its sum over the processes (a parameter a
        process gave no gradient counts as zeros there), in flat buckets."""
        if not self.active:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))

    def broadcast_params(self, module: torch.nn.Module) -> None:
        """Every process takes process 0's parameters and buffers (a LoRA init, say, drawn
        from each process's own generator)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def in_sync(self, module: torch.nn.Module) -> bool:
        """Whether every process holds the same parameters (each parameter's float64 sum
        compared across processes)."""
        if not self.active:
            return True
        with torch.no_grad():
            sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in module.parameters()]).to(self.device)  # [n_params]
        hi, neg_lo = sums.clone(), -sums
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(neg_lo, op=dist.ReduceOp.MAX)
        return bool(torch.equal(hi, -neg_lo))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


SUMMED_METRICS = ("packed_tokens", "unpacked_tokens", "refilled_prompts")
"""Step metrics that are counts: summed over the processes (as are ``reward_failures/*``);
``time_*`` take the slowest process; the rest are means over processes (their shares of a step
are the same size)."""

def pool_metrics(rows: list[dict]) -> dict:
    """One step's metrics from every process's ``rows`` (:data:`SUMMED_METRICS`); a key some
    processes lack is pooled over those that have it; non-numbers are process 0's."""
    out: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = [r[key] for r in rows if key in r]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = vals[0]
        elif key in SUMMED_METRICS or key.startswith("reward_failures/"):
            out[key] = sum(vals)
        elif key.startswith("time_"):
            out[key] = max(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out


def _buckets(grads: list[Tensor]) -> Iterable[list[Tensor]]:
    """``grads`` in order, grouped into runs of one dtype and device of at most
    :data:`BUCKET_ELEMENTS` elements (a larger tensor alone)."""
    bucket: list[Tensor] = []
    size = 0
    for g in grads:
        if bucket and (size + g.numel() > BUCKET_ELEMENTS or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        yield bucket


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it (0 without ``torchrun``)."""
    return int(os.environ.get("RANK", "0"))


def from_env(device: torch.device, timeout_minutes: float = 60.0) -> tuple[Dist, torch.device]:
    """The job's :class:`Dist` from ``torchrun``'s environment, and the device this process
    trains on (``cuda:LOCAL_RANK`` when ``device`` is CUDA); makes the process group. One
    process (no ``WORLD_SIZE``, or 1): ``Dist()`` and ``device`` unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank, world, device), device
