"""``Collectives`` over a torch.distributed process group: the sharded path's reductions and its
exact selection (radix select), with an account of every collective issued."""

from __future__ import annotations

import time
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..shards import Collectives, Shard, beside_shards
from .radix import DEFAULT_DIGITS, radix_select_topk

#: Backends that carry host tensors: their collectives take CPU payloads whatever else they accept.
_HOST_BACKENDS = ("gloo", "mpi")


def backend_device(backend: str) -> torch.device:
    """The device a backend's collectives take their tensors on: the current accelerator for a
    device backend (NCCL: ``cuda:current_device()``; HCCL, XCCL and other registered ones alike),
    the host for gloo and MPI. ``backend`` is what ``dist.get_backend`` returns: one name, or
    ``"cpu:gloo,cuda:nccl"`` for a group with one backend per device type (the accelerator's wins,
    so payloads computed there need not visit the host)."""
    name = str(backend).lower()
    if ":" in name:
        pairs = [tuple(part.split(":", 1)) for part in name.split(",")]
    else:
        pairs = [(d, name) for d in dist.Backend.backend_capability.get(name, ["cpu"])]
    for device_type, served_by in pairs:
        if device_type == "cpu" or served_by in _HOST_BACKENDS:
            continue
        module = getattr(torch, device_type, None)
        if module is not None and hasattr(module, "is_available") and module.is_available():
            return torch.device(device_type, module.current_device())
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    """Waits for the work queued on an accelerator (collectives there return once enqueued)."""
    if device.type == "cpu":
        return
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "synchronize") and module.is_available():
        module.synchronize(device)


class ShardedCollectives(Collectives):
    """Each process holds a contiguous range of every masked layer (possibly empty).

    ``device`` is where payloads travel: by default the group's backend's (``backend_device``),
    so under NCCL the histograms and counts of a host-resident (offloaded) shard are copied to the
    current GPU and the results back; a payload already there is used in place. ``digits`` (radix
    digit widths) trades passes for payload: the default (12, 10, 10) is at most three histogram
    all_reduces, of 4096, 1024 and 1024 counts per open pool."""

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        digits: Sequence[int] = DEFAULT_DIGITS,
        device: Optional[Union[str, torch.device]] = None,
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedCollectives needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.digits = tuple(digits)
        self.device = torch.device(device) if device is not None else backend_device(dist.get_backend(group))

    def to_comm(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the communication device, contiguous: itself where it already is, else a copy."""
        return tensor.to(self.device).contiguous()

    def _timed(self, fn, bytes_sent: int) -> None:
        start = time.perf_counter()
        fn()
        _synchronize(self.device)
        self.stats.seconds += time.perf_counter() - start
        self.stats.collectives += 1
        self.stats.bytes_sent += bytes_sent

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        payload = self.to_comm(tensor)
        w = self.world_size
        nbytes = payload.numel() * payload.element_size()
        self._timed(lambda: dist.all_reduce(payload, group=self.group), 2 * (w - 1) * nbytes // w)
        if payload is not tensor:
            tensor.copy_(payload)
        return tensor

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        payload = self.to_comm(row)
        out = [torch.empty_like(payload) for _ in range(self.world_size)]
        nbytes = payload.numel() * payload.element_size()
        self._timed(lambda: dist.all_gather(out, payload, group=self.group), (self.world_size - 1) * nbytes)
        return torch.stack(out).to(row.device)

    def select_topk(
        self,
        scores: Sequence[torch.Tensor],
        pools,
        k: torch.Tensor,
        eligible: Optional[Sequence[torch.Tensor]] = None,
        shards: Optional[Sequence[Shard]] = None,
        packed: bool = False,
    ) -> List[torch.Tensor]:
        if shards is None or len(shards) != len(scores):
            raise ValueError("sharded selection needs each layer's shard (its global offset)")
        for a, b in zip(shards, shards[1:]):
            if b.layer.index <= a.layer.index:
                raise ValueError("shards must list every masked layer once, in plan order")
        chosen = radix_select_topk(
            self,
            scores,
            pools,
            k,
            eligible,
            [s.offset for s in shards],
            layer_pools=[s.layer.pools for s in shards],
            digits=self.digits,
            max_pool_size=sum(s.layer.numel for s in shards),
            packed=packed,
        )
        return beside_shards(chosen, shards)
