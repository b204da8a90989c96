"""Several ranks as threads of one process, with collectives over shared memory.

Runs the real sharded algorithm at many world sizes and partitions in milliseconds, for property
tests; the gloo tests (test_sharded_gloo.py) then check the same code over torch.distributed."""

from __future__ import annotations

import threading
from typing import Any, Callable, List

import torch

from rigl_ds.shards import Collectives


class ThreadCollectives(Collectives):
    def __init__(self, world: "ThreadWorld", rank: int):
        super().__init__()
        self.world, self.rank, self.world_size = world, rank, world.size

    def _exchange(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        w = self.world
        w.slots[self.rank] = tensor.clone()
        w.barrier.wait()
        everyone = list(w.slots)
        w.barrier.wait()  # nobody overwrites a slot before all have read
        self.stats.collectives += 1
        self.stats.bytes_sent += tensor.numel() * tensor.element_size()  # payload, not a ring's traffic
        return everyone

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        everyone = self._exchange(tensor)
        tensor.copy_(torch.stack(everyone).sum(0))
        return tensor

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(row))


class ThreadWorld:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: List[Any] = [None] * size


def run_threads(size: int, fn: Callable[[Collectives], Any]) -> List[Any]:
    """``fn(comm)`` on ``size`` ranks at once; returns each rank's result, re-raises the first error."""
    world = ThreadWorld(size)
    results: List[Any] = [None] * size
    errors: List[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadCollectives(world, rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results
