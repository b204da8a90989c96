"""Runs a function on N CPU processes joined by a gloo process group (as DeepSpeed's
DistributedTest does), and hands each rank's return value back to the test."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import traceback
from typing import Any, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def end_rank() -> None:
    """Ends a rank whose work is done and written, without interpreter finalization.

    A gloo worker thread (ProcessGroupGloo::runLoop) drops its reference to a finished collective,
    and so to the collective's tensors, a moment after ``wait()`` has returned in the main thread.
    When Python has already let go of those tensors, that drop frees their Python objects and must
    take the GIL; if the interpreter is finalizing by then, CPython 3.11 ends the thread with
    ``pthread_exit``, whose unwinding hits a noexcept destructor: std::terminate ("terminate called
    without an active exception"), SIGABRT, exit 250 under the deepspeed launcher (core dump: the
    abort is in ``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject`` -> ``take_gil`` ->
    ``PyThread_exit_thread``). ``destroy_process_group()`` does not join those threads: DeepSpeed's
    data-parallel group lives on in the engine, which its autograd hooks keep alive until module
    teardown, and gloo's ``shutdown()`` / ``abort()`` join nothing. So the rank ends before
    finalization, with its output flushed; only after success (a failure exits non-zero anyway).

    Also removes this rank's DeepSpeed shm all-reduce workspace (69 MB in /dev/shm, created at
    init_distributed when every rank is local and never unlinked by DeepSpeed 0.19.8: launcher tests
    had filled 20 of this machine's 24 GB). Every peer mapped it during init_distributed."""
    shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
    try:
        os.unlink(f"{shm}_{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '')}")
    except FileNotFoundError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
