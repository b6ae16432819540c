"""The process group of a ``torchrun`` launch, seen as one small object every experiment shares.

``Dist`` is this process's place (rank 0 of 1 when not launched by torchrun): its share of a global
batch, sums over all processes, a barrier, and the one DistributedDataParallel wrap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's rank among ``world_size`` data-parallel processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def slice(self, n: int) -> slice:
        """This rank's share of ``n`` items; ``n`` must split evenly."""
        if n % self.world_size:
            raise ValueError(f"global batch {n} does not split evenly over {self.world_size} processes")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over all processes (in float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (gradients averaged) when there are several processes,
        else ``model`` itself. Checkpoints hold the unwrapped module."""
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model)


def init_distributed(device: str) -> Dist:
    """Join the process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device(device))
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, world_size=world, device=torch.device(device))
