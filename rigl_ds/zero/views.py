"""Shard views onto what ZeRO keeps on this rank, for every stage.

- ZeRO-1/2, and bf16 at stage 0 (DeepSpeed's BF16_Optimizer): the fp32 master is a flat partition
  per param group cut without regard to parameter boundaries; ``param._hp_mapping`` (DeepSpeed's
  tensor-fragment API) says which contiguous range of the parameter lives here, if any.
- ZeRO-3: each parameter is cut into ceil(numel / world) slices, rank r holding [r*part,
  (r+1)*part); the last ranks' slices are padded and the padding is never masked or counted.
- ZeRO-0 with fp32: every rank holds the whole parameter, gradients are all-reduced, and the
  torch optimizer steps the parameter itself.

Every view is a live 1-D tensor onto DeepSpeed's own storage; nothing here allocates a weight,
gradient or optimizer state.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..plan import LayerPlan, SparsityPlan
from ..shards import Collectives, LocalCollectives, ParamRangeShard, Shard


class HpFragmentShard(Shard):
    """This rank's fragment of a parameter in a flat fp32 partition (ZeRO-1/2, BF16_Optimizer)."""

    def __init__(self, layer: LayerPlan, param: torch.nn.Parameter, optimizer, device: torch.device):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            offset, numel = 0, 0
        else:
            offset, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        super().__init__(layer, offset, numel, mapping.hp_fragment.device if mapping is not None else device)
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
        flats = getattr(self.optimizer, "single_partition_of_fp32_groups", None)
        if flats is None:
            flats = self.optimizer.fp32_groups_flat_partition
        return flats[self.mapping.param_group_index]

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


class Stage3Shard(Shard):
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


class Stage0Shard(ParamRangeShard):
    """ZeRO-0 with fp32: the whole parameter, stepped in place by the torch optimizer."""

    storage_offset = 0

    @property
    def storage(self) -> torch.Tensor:
        return self.param


class UnfusedMasterShard(ParamRangeShard):
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


def zero_shards(
    engine, plan: SparsityPlan, weights: Dict[str, torch.nn.Parameter]
) -> Tuple[List[Shard], Collectives, str]:
    """This rank's shard of every masked layer (empty where it holds none) and the collectives
    they agree through. Returns (shards, collectives, layout) with layout one of
    ``"whole"``, ``"fragments"`` or ``"stage3"``."""
    from ..select import ShardedCollectives

    stage = engine.zero_optimization_stage()
    optimizer = engine.optimizer
    group = getattr(optimizer, "dp_process_group", None)
    if stage == 3:
        comm = ShardedCollectives(group)
        shards: List[Shard] = [Stage3Shard(layer, weights[layer.name], optimizer, comm.rank) for layer in plan.layers]
        return shards, comm, "stage3"
    params = [weights[layer.name] for layer in plan.layers]
    if any(hasattr(p, "_hp_mapping") for p in params):
        comm = ShardedCollectives(group)
        device = params[0].device
        shards = [HpFragmentShard(layer, weights[layer.name], optimizer, device) for layer in plan.layers]
        return shards, comm, "fragments"
    basic = engine.basic_optimizer
    if stage == 0 and optimizer is basic:
        return [Stage0Shard(layer, weights[layer.name], basic) for layer in plan.layers], LocalCollectives(), "whole"
    if stage == 0 and hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        masters = {
            id(lp): master
            for lp_group, master_group in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for lp, master in zip(lp_group, master_group)
        }
        shards = [
            UnfusedMasterShard(layer, weights[layer.name], masters[id(weights[layer.name])], basic)
            for layer in plan.layers
        ]
        return shards, LocalCollectives(), "whole"
    raise NotImplementedError(
        f"rigl_ds: no mask layout for ZeRO stage {stage} with DeepSpeed's {type(optimizer).__name__} "
        "(supported: stage 0 fp32 or bf16, stages 1-3)"
    )
