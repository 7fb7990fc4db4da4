"""Process groups for ``torchrun``: one code path for a single process, NCCL GPUs and gloo CPUs.

``torchrun --nproc_per_node N -m dlkunet train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them training runs as a world of one and nothing here touches ``torch.distributed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: not distributed

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU if CUDA exists, else CPU; 'cuda' without CUDA is an error."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available here")
        if requested == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this rank's device."""
    if not launched_by_torchrun():
        return DistInfo(device=pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (in place); a no-op for a world of one."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (a no-op for a world of one)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
