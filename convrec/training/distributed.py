"""Process-group setup for ``torchrun``: NCCL on GPUs, gloo on CPU; a no-op in one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ProcessGroup:
    """This process's place in the run: rank, world size and the device it trains on."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @classmethod
    def from_environment(cls, device: str) -> ProcessGroup:
        """Join the group ``torchrun`` describes in the environment, or run alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, torch.device(device))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            target = torch.device("cuda", local_rank)
        else:
            target = torch.device("cpu")
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), target, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions that must agree, like stopping)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
