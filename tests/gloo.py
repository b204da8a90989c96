"""Runs a function on N CPU processes joined by a gloo process group (as DeepSpeed's
DistributedTest does), and hands each rank's return value back to the test."""

from __future__ import annotations

import importlib
import os
import tempfile
import time
import traceback
from typing import Any, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rigl_ds.rank_exit import end_rank


def _entry(rank: int, world: int, workdir: str, target: str, args: tuple) -> None:
    torch.set_num_threads(1)  # ranks share the cores; more threads each makes them several times slower
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher would
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world)
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(*args)
        torch.save(result, os.path.join(workdir, f"result{rank}.pt"))
    except BaseException:
        with open(os.path.join(workdir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    end_rank()


def run_gloo(world: int, target: str, *args: Any, timeout: float = 300) -> List[Any]:
    """``target`` ("module:function", importable from tests/) on ``world`` ranks; each rank's result."""
    with tempfile.TemporaryDirectory() as workdir:
        ctx = mp.start_processes(
            _entry, args=(world, workdir, target, args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target} on {world} gloo ranks did not finish in {timeout} s")
        except Exception:
            errors = [
                open(os.path.join(workdir, f)).read() for f in sorted(os.listdir(workdir)) if f.startswith("error")
            ]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"{target} failed on {world} ranks:\n" + "\n".join(errors)) from None
        return [torch.load(os.path.join(workdir, f"result{r}.pt"), weights_only=False) for r in range(world)]
