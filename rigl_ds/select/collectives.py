"""``Collectives`` over a torch.distributed process group: the sharded path's reductions and its
exact selection (radix select), with an account of every collective issued."""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from ..shards import Collectives, Shard
from .radix import DEFAULT_DIGITS, radix_select_topk


class ShardedCollectives(Collectives):
    """Each process holds a contiguous range of every masked layer (possibly empty).

    ``digits`` (radix digit widths) trades passes for payload: the default (12, 10, 10) is at most
    three histogram all_reduces, of 4096, 1024 and 1024 counts per open pool."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, digits: Sequence[int] = DEFAULT_DIGITS):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedCollectives needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.digits = tuple(digits)

    def _timed(self, fn, tensor: torch.Tensor, bytes_sent: int) -> None:
        start = time.perf_counter()
        fn()
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        self.stats.seconds += time.perf_counter() - start
        self.stats.collectives += 1
        self.stats.bytes_sent += bytes_sent

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        payload = tensor.numel() * tensor.element_size()
        w = self.world_size
        self._timed(lambda: dist.all_reduce(tensor, group=self.group), tensor, 2 * (w - 1) * payload // w)
        return tensor

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        row = row.contiguous()
        out = [torch.empty_like(row) for _ in range(self.world_size)]
        payload = row.numel() * row.element_size()
        self._timed(lambda: dist.all_gather(out, row, group=self.group), row, (self.world_size - 1) * payload)
        return torch.stack(out)

    def select_topk(
        self,
        scores: Sequence[torch.Tensor],
        pools,
        k: torch.Tensor,
        eligible: Optional[Sequence[torch.Tensor]] = None,
        shards: Optional[Sequence[Shard]] = None,
    ) -> List[torch.Tensor]:
        if shards is None or len(shards) != len(scores):
            raise ValueError("sharded selection needs each layer's shard (its global offset)")
        for a, b in zip(shards, shards[1:]):
            if b.layer.index <= a.layer.index:
                raise ValueError("shards must list every masked layer once, in plan order")
        return radix_select_topk(
            self,
            scores,
            pools,
            k,
            eligible,
            [s.offset for s in shards],
            layer_pools=[s.layer.pools for s in shards],
            digits=self.digits,
            max_pool_size=sum(s.layer.numel for s in shards),
        )
