"""torchrun integration: one flag turns a command data-parallel."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: str


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world_size: int) -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def distributed_context(enabled: bool, device: str = "auto") -> Iterator[DistContext]:
    """Initialise the process group from torchrun's environment when `enabled`.

    NCCL with one GPU per local rank on CUDA, gloo on CPU."""
    if not enabled:
        yield DistContext(0, 1, device)
        return
    if "RANK" not in os.environ:
        from usae_core.errors import UsaeError

        raise UsaeError("--distributed needs torchrun (e.g. torchrun --nproc-per-node 2 -m app.cli ...)")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.barrier()
        dist.destroy_process_group()
