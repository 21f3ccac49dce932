r"""Data-parallel training under ``torchrun``: the process group, each rank's share of a batch, reductions.

``torchrun --nproc_per_node N -m stablenet.cli -- train -c CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in their environment; :func:`init_distributed` joins the group
(``nccl`` on GPUs, ``gloo`` on CPUs) and gives every rank one device. Multi-node runs use torchrun's standard
rendezvous (``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``); nothing here depends on the node
count.

# Note [global batch]
``batch_size`` is the global batch. Every rank draws the same permutation, crops, flips and noise for the whole
global batch (the loader's generators are seeded alike on every rank) and keeps its own rows (every
``world``-th, :func:`shard`), so the union of the ranks' samples is exactly the single-process batch. DDP averages the
ranks' gradients with equal weights, so each rank scales its mean loss by ``world * n_rank / n_batch``
(:func:`loss_weight`): the averaged gradient is then the gradient of the batch mean, also for a last batch that
does not split evenly, and the weights after training equal a single-process run's up to the order of
floating-point sums. Caveats: BatchNorm layers normalise each rank's slice (use SyncBatchNorm for the
single-process statistics); SAM's ascent step is per rank (Note [SAM and DDP] in ``stablenet.curvature.sam``);
regularisers are computed per rank on its slice.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistributedContext", "init_distributed", "loss_weight", "shard"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the run: its rank, the world size and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: Tensor) -> Tensor:
        """The element-wise sum of ``values`` over the ranks (a copy; ``values`` itself unchanged)."""
        total = values.detach().clone()
        if self.active:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective: every rank must call it at the same point)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (collective)."""
        return not self.all_true(not flag)

    def gather(self, obj: object) -> list[object]:
        """``obj`` of every rank, by rank (collective)."""
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun set up (``WORLD_SIZE > 1``), or a one-process context otherwise.

    Under torchrun each rank takes ``cuda:LOCAL_RANK`` when ``device`` is CUDA, and CPUs use ``gloo``.

    Raises:
        ValueError: a CUDA device with fewer GPUs than local ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local} needs a GPU but this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank, world, device)


def shard(batch: Tensor, context: DistributedContext) -> Tensor:
    """This rank's share of a global batch: rows ``rank, rank + world, ...`` (Note [global batch]), the rows
    ``torch.utils.data.DistributedSampler`` and :class:`stablenet.data.StreamingLoader` give a rank."""
    if not context.active:
        return batch
    return batch[context.rank :: context.world]


def loss_weight(rank_size: int, batch_size: int, context: DistributedContext) -> float:
    """The factor on this rank's mean loss that makes DDP's averaged gradient the batch mean's gradient."""
    if not context.active:
        return 1.0
    return context.world * rank_size / batch_size
