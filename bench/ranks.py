"""Start benchmark ranks the way a launcher would: gloo CPU processes, or one NCCL rank per GPU."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def join(rank: int, world: int, store: str, backend: str) -> str:
    """Joins the process group as ``rank``; returns the rank's device. CPU ranks split the cores
    between them (more intra-op threads than cores per rank makes each several times slower)."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    return device


def spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    """Runs ``worker(rank, world, store, *args)`` on ``world`` spawned processes."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker, args=(world, os.path.join(d, "store"), *args), nprocs=world, start_method="spawn")
