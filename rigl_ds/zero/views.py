"""Shard views onto what ZeRO keeps on this rank, for every stage.

- ZeRO-1/2, and bf16 at stage 0 (DeepSpeed's BF16_Optimizer): the fp32 master is a flat partition
  per param group cut without regard to parameter boundaries; ``param._hp_mapping`` (DeepSpeed's
  tensor-fragment API) says which contiguous range of the parameter lives here, if any.
- ZeRO-3: each parameter is cut into ceil(numel / world) slices, rank r holding [r*part,
  (r+1)*part); the last ranks' slices are padded and the padding is never masked or counted.
- ZeRO-0 with fp32: every rank holds the whole parameter, gradients are all-reduced, and the
  torch optimizer steps the parameter itself.

Every view is a live 1-D tensor onto DeepSpeed's own storage; nothing here allocates a weight,
gradient or optimizer state. A shard's ``device`` is its fp32 master's (the host under
``offload_optimizer``); its ``extra_copies`` (low-precision weights) may live on the accelerator,
and ``rigl_ds.masks`` masks each tensor with the mask on that tensor's own device.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..plan import LayerPlan
from ..shards import ParamRangeShard, Shard


class FlatStorage:
    """Mixed into every view below: the fp32 master of the shard's range is ``[storage_offset,
    storage_offset + numel)`` of ``storage``, a tensor the torch optimizer steps (None where the rank
    holds none of the weight)."""

    storage: Optional[torch.Tensor]
    storage_offset: int
    # A rigl_ds.compact optimizer that keeps the fp32 values of active entries itself (compact master
    # weights; set by ZeroLayout.read_compact_masters): magnitude ranking reads them there.
    compact_masters: Optional[Any] = None

    def precise_weight(self) -> torch.Tensor:
        if self.compact_masters is not None:
            values = self.compact_masters.master_range(self.storage, self.storage_offset, self.numel)
            if values is not None:
                return values
        return self.weight


def _fp32_partitions(optimizer) -> List[Optional[torch.Tensor]]:
    """The flat fp32 partitions the torch optimizer steps (ZeRO-1/2 or BF16_Optimizer naming)."""
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(optimizer, "fp32_groups_flat_partition", None)
    return list(flats or [])


class HpFragmentShard(FlatStorage, Shard):
    """This rank's fragment of a parameter in a flat fp32 partition (ZeRO-1/2, BF16_Optimizer).

    A rank holding none of the parameter still reports the fp32 partitions' device (the host under
    offload), not the parameter's, so that every shard of a layout sits where its counts are made;
    ``device`` is the fallback when the optimizer has no partition."""

    def __init__(self, layer: LayerPlan, param: torch.nn.Parameter, optimizer, device: torch.device):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            offset, numel = 0, 0
            device = next((f.device for f in _fp32_partitions(optimizer) if f is not None), device)
        else:
            offset, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            device = mapping.hp_fragment.device
        super().__init__(layer, offset, numel, device)
        self.param = param
        self.optimizer = optimizer

    @property
    def mapping(self):
        """Read on every use: DeepSpeed builds new mappings when it loads a checkpoint."""
        return getattr(self.param, "_hp_mapping", None)

    @property
    def storage(self) -> Optional[torch.Tensor]:
        """The flat fp32 partition the torch optimizer steps (ZeRO-1/2 or BF16_Optimizer naming)."""
        if self.mapping is None:
            return None
        return _fp32_partitions(self.optimizer)[self.mapping.param_group_index]

    @property
    def storage_offset(self) -> int:
        """Where this fragment starts inside ``storage``."""
        return 0 if self.mapping is None else self.mapping.hp_fragment_address.start

    @property
    def weight(self) -> torch.Tensor:
        if self.mapping is None:
            return torch.empty(0, device=self.device)
        return self.mapping.hp_fragment.detach().view(-1)

    def grad(self) -> Optional[torch.Tensor]:
        if self.mapping is None:
            return torch.empty(0, device=self.device)
        try:
            g = self.mapping.get_lp_grad_fragment(self.param._index_in_param_group)
        except ValueError:  # DeepSpeed: only between backward and the engine step
            return None
        if g is None:
            return None
        g = g.detach().view(-1)
        if g.numel() == self.param.numel() and g.numel() != self.numel:  # a whole-parameter buffer
            g = g.narrow(0, self.offset, self.numel)
        return g

    def optimizer_states(self) -> List[torch.Tensor]:
        if self.mapping is None or not self.mapping.optim_fragment:
            return []  # linked by DeepSpeed after the first optimizer step; nothing to zero before
        return [t.detach().view(-1) for t in self.mapping.optim_fragment.values() if t.is_floating_point()]

    def extra_copies(self) -> List[torch.Tensor]:
        if self.mapping is None:
            return []
        return [self.mapping.lp_fragment.detach().view(-1)]


class Stage3Shard(FlatStorage, Shard):
    """This rank's slice of a ZeRO-3 partitioned parameter: fp32 master, gradient, optimizer
    state and the low-precision ``ds_tensor``, all without the padding."""

    def __init__(self, layer: LayerPlan, param: torch.nn.Parameter, optimizer, rank: int):
        part = param.ds_tensor.numel()
        offset = min(rank * part, layer.numel)
        numel = max(0, min(part, layer.numel - offset))
        self.param = param
        self.optimizer = optimizer
        weight, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        super().__init__(layer, offset, numel, weight.device)

    def _fp32(self, key: Optional[str] = None) -> torch.Tensor:
        t, _ = self.optimizer._get_fp32_opt_state_partition(self.param, release_swap_buffers=False, optim_state_key=key)
        return t.detach().view(-1).narrow(0, 0, self.numel)

    @property
    def storage(self) -> torch.Tensor:
        group, _, _ = self.optimizer.grad_position[self.optimizer.get_param_id(self.param)]
        return self.optimizer.fp32_partitioned_groups_flat[group]

    @property
    def storage_offset(self) -> int:
        """Where this parameter's slice starts inside ``storage`` (its sub-group's flat partition)."""
        return self.optimizer.grad_position[self.optimizer.get_param_id(self.param)][1]

    @property
    def weight(self) -> torch.Tensor:
        return self._fp32()

    def grad(self) -> Optional[torch.Tensor]:
        g, _ = self.optimizer._get_fp32_grad_state_partition(self.param, release_swap_buffers=False)
        return None if g is None else g.detach().view(-1).narrow(0, 0, self.numel)

    def optimizer_states(self) -> List[torch.Tensor]:
        state = self.optimizer.optimizer.state.get(self.storage, {})
        return [
            self._fp32(key)
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == self.storage.shape
        ]

    def extra_copies(self) -> List[torch.Tensor]:
        return [self.param.ds_tensor.detach().view(-1).narrow(0, 0, self.numel)]


class Stage0Shard(FlatStorage, ParamRangeShard):
    """ZeRO-0 with fp32: the whole parameter, stepped in place by the torch optimizer."""

    storage_offset = 0

    @property
    def storage(self) -> torch.Tensor:
        return self.param


class UnfusedMasterShard(FlatStorage, ParamRangeShard):
    """ZeRO-0 with bf16 (DeepSpeed's FP16_UnfusedOptimizer): the torch optimizer steps a whole fp32
    copy of each parameter, and DeepSpeed copies it into the bf16 parameter after the step."""

    def __init__(self, layer: LayerPlan, param: torch.nn.Parameter, master: torch.Tensor, optimizer):
        super().__init__(layer, param, optimizer)
        self.master = master

    storage_offset = 0

    @property
    def storage(self) -> torch.Tensor:
        return self.master

    @property
    def weight(self) -> torch.Tensor:
        return self.master.detach().view(-1)

    def grad(self) -> Optional[torch.Tensor]:
        return None if self.param.grad is None else self.param.grad.detach().view(-1)  # copied to fp32 in step

    def optimizer_states(self) -> List[torch.Tensor]:
        state = self.optimizer.state.get(self.master, {})
        return [
            v.view(-1)
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.shape == self.master.shape and v.is_floating_point()
        ]

    def extra_copies(self) -> List[torch.Tensor]:
        return [self.param.data.view(-1)]
