"""Process group setup for `torchrun` (NCCL on GPU, gloo on CPU) and the few small collectives
training uses (sums of tallies, barriers). Gradients meet across ranks through DDP or FSDP2
(fvlm/training/engine.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as torch_dist

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums a short vector of numbers over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tally(self, tally: T) -> T:
        """A dataclass of numbers summed over ranks field by field (the host numbers in one all-reduce).
        Fields holding device tensors (a step's loss sums, read only when logged) are summed on the
        device, in place: nothing waits for them here."""
        names = [f.name for f in dataclasses.fields(tally)]
        on_host = [n for n in names if not isinstance(getattr(tally, n), torch.Tensor)]
        if self.enabled:
            for name in names:
                if name not in on_host:
                    torch_dist.all_reduce(getattr(tally, name))
        summed = self.all_sum([float(getattr(tally, name)) for name in on_host])
        return dataclasses.replace(tally, **dict(zip(on_host, summed)))

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Rank 0's weights everywhere, so ranks cannot start from different initialisations."""
        if not self.enabled:
            return
        for tensor in list(model.parameters()) + list(model.buffers()):
            torch_dist.broadcast(tensor.data, src=0)


def init_distributed() -> Dist:
    """Joins the torchrun process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
