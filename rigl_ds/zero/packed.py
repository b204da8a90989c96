"""Packed storage (``"storage": "packed"``) under DeepSpeed, ZeRO stages 0-3.

The model is packed before DeepSpeed builds its engine (``pack_before_engine``), so the active
values are ordinary parameters: ZeRO flattens and partitions them, its optimizers (torch's, FusedAdam,
DeepSpeedCPUAdam) step them, and nothing of rigl_ds reaches into ZeRO's flat buffers. At stages 0-2
every rank holds the whole (low-precision) values and positions, as ZeRO keeps every parameter
whole there, so each rank selects on whole layers and reaches the same masks without collectives;
the dense gradient a method reads is averaged over the data-parallel group when it is read.

A mask update writes the changed slots through DeepSpeed's public tensor-fragment API
(``safe_get/set_full_fp32_param``, ``safe_get/set_full_optimizer_state``: the fp32 master and
optimizer state of the values, one layer at a time) and into the low-precision values directly.
At ZeRO-3 the values and positions are parameters ZeRO partitions (positions never trained), so
nothing that grows with a layer is whole on any rank between layers. Each rank then scores its own
contiguous range of every layer's dense index space (|w| from the gathered values, the dense
gradient reduced and cut to the range in backward), the exact sharded selection finds the masks, and
each layer's new mask (1/8 byte an entry) is all-gathered so that every rank computes the same slot
assignment; DeepSpeed re-partitions the values and positions from the gathered copies.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import bits
from ..config import RigLConfig, RigLConfigError
from ..host_memory import freed_buffers_return_to_the_os
from ..packed import PackedShard, ScatterToDense, TorchSlots, arm_dense_gradients, check_positions, pack_model
from ..plan import SparsityPlan
from ..shards import LocalCollectives, Shard, WholeTensorShard
from .layout import FragmentLayout, Stage3Layout


class DeepSpeedSlots(TorchSlots):
    """A packed layer's slots where a DeepSpeed engine keeps them: the low-precision values are
    the module's parameter (whole at ZeRO 0-2); the fp32 master and optimizer state are DeepSpeed's,
    reached through its public API. At ZeRO-0 with a torch optimizer stepping the parameters
    themselves there is no separate master (``TorchSlots``' way)."""

    def __init__(self, engine: Any):
        super().__init__(engine.basic_optimizer)
        self.engine = engine

    @staticmethod
    def _has_master(values: nn.Parameter) -> bool:
        return hasattr(values, "_hp_mapping") or hasattr(values, "ds_id")

    def precise_values(self, values: nn.Parameter) -> torch.Tensor:
        if self._has_master(values):
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(values).detach().float()
        return values.detach()

    def _state_keys(self) -> List[str]:
        keys = set()
        for state in self.engine.basic_optimizer.state.values():
            keys.update(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
        return sorted(keys)

    def write(self, values: nn.Parameter, slots: torch.Tensor, new: torch.Tensor) -> None:
        if not self._has_master(values):
            super().write(values, slots, new)  # stage 0 without a separate master
            return
        if hasattr(values, "ds_id"):
            self._write_partition(values, slots, new)
            return
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        master = safe_get_full_fp32_param(values)
        master[slots.to(master.device)] = new.to(master.device, master.dtype)
        safe_set_full_fp32_param(values, master)
        for key in self._state_keys():
            state = safe_get_full_optimizer_state(values, key)
            if state is None:
                continue
            state[slots.to(state.device)] = 0
            safe_set_full_optimizer_state(values, state, key)
        with torch.no_grad():
            values[slots.to(values.device)] = new.to(values.device, values.dtype)


    def _write_partition(self, values: nn.Parameter, slots: torch.Tensor, new: torch.Tensor) -> None:
        """ZeRO-3: this rank's partition of the fp32 master and optimizer state, through the local
        API (the full-tensor setter of DeepSpeed 0.19.8 misreads the last partition of a parameter
        whose size the world does not divide), then the low-precision values, gathered and
        re-partitioned by DeepSpeed."""
        import deepspeed
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        size = values.ds_tensor.ds_numel
        start = dist.get_rank(group=values.ds_process_group) * size
        mine = (slots >= start) & (slots < start + size)
        local_slots, local_new = slots[mine] - start, new[mine.to(new.device)]
        master = safe_get_local_fp32_param(values).detach().clone()
        master[local_slots.to(master.device)] = local_new.to(master.device, master.dtype)
        safe_set_local_fp32_param(values, master)
        for key in self._state_keys():
            state = safe_get_local_optimizer_state(values, key).detach().clone()
            state[local_slots.to(state.device)] = 0
            safe_set_local_optimizer_state(values, state, key)
        with deepspeed.zero.GatheredParameters([values], modifier_rank=0):
            values.data[slots.to(values.device)] = new.to(values.device, values.dtype)


class PackedLayout(FragmentLayout):
    """This rank's packed layers, for ``SparseEngine``: nothing is masked at a step (the values
    have no masked entries) and the dense gradients a method reads are captured in backward only on
    steps that read them. At ZeRO 0-2 every rank selects on whole layers; at ZeRO-3 on its range of
    each (``Stage3PackedShard``) through the sharded selection. The values' optimizer-state fragments
    are linked as for masked fragments (``FragmentLayout``); overflow is DeepSpeed's own check."""

    name = "packed"

    def __init__(self, engine: Any, plan: SparsityPlan):
        group = getattr(engine.optimizer, "dp_process_group", None) or getattr(engine, "data_parallel_group", None)
        world = dist.get_world_size(group) if dist.is_initialized() else 1

        def average(grad: torch.Tensor) -> torch.Tensor:
            if world > 1:
                dist.all_reduce(grad, group=group)
                grad.mul_(1.0 / world)  # as DeepSpeed averages its gradients: sum, then scale by 1/world
            return grad

        slots = DeepSpeedSlots(engine)
        modules = dict(engine.module.named_modules())
        shards: List[PackedShard] = []
        if engine.zero_optimization_stage() == 3:
            from ..select import ShardedCollectives

            comm = ShardedCollectives(group)
            for layer in plan.layers:
                path, _, name = layer.name.rpartition(".")
                shards.append(Stage3PackedShard(layer, modules[path], name, slots, comm))
        else:
            comm = LocalCollectives()
            for layer in plan.layers:
                path, _, name = layer.name.rpartition(".")
                shards.append(PackedShard(layer, modules[path], name, slots, reduce_gradient=average))
        super().__init__(engine, shards, comm)

    def stepped_shards(self) -> list:
        return []  # the optimizer steps active values only: nothing to re-mask after it

    def gradients_overflow(self) -> bool:
        if self.engine.zero_optimization_stage() == 3:
            return Stage3Layout.gradients_overflow(self)
        return super().gradients_overflow()

    def link_optimizer_state(self) -> None:
        if hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            super().link_optimizer_state()

    def refresh_low_precision(self) -> None:
        """``DeepSpeedSlots.write`` wrote the low-precision values itself."""

    def repack_optimizer_state(self) -> None:
        """No compact state with packed storage (its state is per active entry already)."""

    def arm(self, controller: Any) -> None:
        arm_dense_gradients(self.shards, controller, at_boundary=self.engine.is_gradient_accumulation_boundary)

    def after_load(self) -> None:
        check_positions(self.shards)


def refuse_packed(ds_config: Dict[str, Any], model: nn.Module, config: Optional[RigLConfig] = None) -> None:
    """What packed storage does not run under yet, refused by the setting's name."""
    from deepspeed.pipe import PipelineModule

    if config is not None and config.method_class.selects_in_backward and not config.skip_step_on_update:
        gas = _accumulation_steps(ds_config)
        if gas > 1:
            # The grown entries' slots would hold the dropped entries' gradients of the earlier
            # micro-batches (``PackedShard._select_in_backward`` also refuses it at run time).
            raise RigLConfigError(
                f'rigl.storage: "packed" with rigl.skip_optimizer_step_on_update false and {gas} micro-batches '
                "per step (gradient_accumulation_steps) is not supported; set skip_optimizer_step_on_update "
                'true (the reference\'s default), one micro-batch per step, or storage: "masked"'
            )

    if isinstance(model, PipelineModule):
        raise RigLConfigError(
            'rigl.storage: "packed" with a PipelineModule (pipeline parallelism) is not supported yet; '
            'use storage: "masked" with pipelines'
        )
    zero = ds_config.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise RigLConfigError(
                f'rigl.storage: "packed" with zero_optimization.{key}.device {device!r} is not supported yet; '
                'use no offload, or storage: "masked"'
            )
    if (ds_config.get("fp16") or {}).get("enabled"):
        raise RigLConfigError(
            'rigl.storage: "packed" with fp16 is not supported yet (its dense gradients would carry the loss '
            'scale); use bf16 or fp32, or storage: "masked"'
        )


def _accumulation_steps(ds_config: Dict[str, Any]) -> int:
    """The config's micro-batches per step, where it says (explicitly, or through the batch sizes)."""
    gas = ds_config.get("gradient_accumulation_steps")
    if isinstance(gas, int):
        return gas
    batch, micro = ds_config.get("train_batch_size"), ds_config.get("train_micro_batch_size_per_gpu")
    if isinstance(batch, int) and isinstance(micro, int) and micro > 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return max(1, batch // (micro * world))
    return 1


def pack_before_engine(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    config: RigLConfig,
    total_steps: Optional[int],
    stage: int = 0,
) -> Tuple[Dict[int, nn.Parameter], SparsityPlan]:
    """Chooses the initial masks on the dense model (the same on every rank: keyed by global index,
    no collective) and packs it; the client optimizer, if any, then steps the values. Returns
    {id(dense parameter): its values} (to fix parameter lists handed to DeepSpeed) and the plan."""
    import deepspeed

    from ..adapter import plan_for_model, start_controller

    weights, plan = plan_for_model(model, config)
    # On CPU ranks the per-layer transients of packing go back to the OS when freed, as while the
    # model was built (``host_memory``).
    with freed_buffers_return_to_the_os(deepspeed.get_accelerator().device_name() == "cpu"):
        if any(hasattr(p, "ds_id") for p in weights.values()):
            return _pack_partitioned(model, weights, plan, config, optimizer), plan
        dense = [WholeTensorShard(layer, weights[layer.name], optimizer) for layer in plan.layers]
        start_controller(config, plan, dense, LocalCollectives(), total_steps, defer_total_steps=True)
        shards = pack_model(model, dense, weights, optimizer, partitioned=stage == 3)
        del dense
    replaced = {id(weights[s.layer.name]): s.values for s in shards}
    return replaced, plan


def _initial_positions(
    layer: Any, plan: SparsityPlan, config: RigLConfig, targets: torch.Tensor, chunk: int = 1 << 20
) -> torch.Tensor:
    """The layer's initial active entries, whole, on every rank without a collective: the keyed
    random scores of mask initialisation (``masks.init_masks``) are a function of the global index,
    and the radix selection in one process chooses exactly what the sharded one would. The scores
    are drawn ``chunk`` entries at a time (the hash's int64 temporaries are 8 bytes an entry), so
    the transient is the layer's fp32 scores and the selection's keys, not several int64 copies."""
    from .. import keyed_random
    from ..select.radix import radix_select_topk

    key = keyed_random.derive_key(config.seed, "init", layer.name)

    def scores() -> torch.Tensor:
        return keyed_random.uniform_range(key, 0, layer.numel, chunk=chunk)

    pools = sorted(set(layer.pools))
    k = torch.zeros_like(targets)
    k[pools] = targets[pools]
    pool_ids = pools[0] if len(pools) == 1 else (lambda: layer.pool_ids(torch.arange(layer.numel)))
    chosen = radix_select_topk(
        LocalCollectives(), [scores], [pool_ids], k, None, [0], layer_pools=[layer.pools], packed=True
    )[0]
    return bits.unpack(chosen, layer.numel).nonzero().flatten()


def _pack_partitioned(
    model: nn.Module,
    weights: Dict[str, nn.Parameter],
    plan: SparsityPlan,
    config: RigLConfig,
    optimizer: Optional[torch.optim.Optimizer],
) -> Dict[int, nn.Parameter]:
    """ZeRO-3 (a model built under ``deepspeed.zero.Init``): one layer at a time, the weight is
    gathered, its initial active values taken, and the parametrization registered with values and
    positions as new parameters (DeepSpeed partitions them when it builds the engine); the dense
    weight's partition is released."""
    import functools

    import deepspeed
    from torch.nn.utils import parametrize

    from ..packed import _checkpointed, _move_in_optimizer

    method = config.method_class(config, plan, None)
    sparsity = method.initial_sparsity
    targets = plan.initial_targets(sparsity)
    owners = {id(p): (m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)}
    replaced: Dict[int, nn.Parameter] = {}
    wrapped = set()
    for layer in plan.layers:
        dense = weights[layer.name]
        module, name = owners[id(dense)]
        positions = _initial_positions(layer, plan, config, targets)
        with deepspeed.zero.GatheredParameters([dense], modifier_rank=None):
            values = dense.detach().reshape(-1).index_select(0, positions.to(dense.device)).clone()
        scatter = ScatterToDense(positions, torch.Size(layer.shape), partitioned=True, initial_values=values)
        # parametrize keeps the parameter object it finds and sets its data to the values: hand it a
        # fresh one, not the ZeRO-3 parameter (whose partition metadata describe the dense weight).
        module._parameters[name] = nn.Parameter(torch.empty(0, dtype=values.dtype, device=values.device))
        parametrize.register_parametrization(module, name, scatter, unsafe=True)
        replaced[id(dense)] = getattr(module.parametrizations, name).original
        if optimizer is not None:
            if optimizer.state.get(dense):
                raise RigLConfigError(
                    f'rigl.storage: "packed": the optimizer already holds state for {layer.name}; pass one that '
                    "has not stepped yet"
                )
            _move_in_optimizer(optimizer, dense, replaced[id(dense)], positions)
        # The dense weight is gone from the model: drop its partition with it.
        dense.ds_tensor.data = torch.empty(0, dtype=dense.ds_tensor.dtype, device=dense.ds_tensor.device)
        if id(module) not in wrapped:
            module.forward = functools.partial(_checkpointed, module, module.forward)
            wrapped.add(id(module))
    return replaced


class Stage3PackedShard(PackedShard):
    """One packed layer under ZeRO-3, seen from one rank: its contiguous range of the layer's dense
    index space (ranks in order, ceil(numel / world) entries each), for the sharded selection.
    Values and positions are ZeRO-3 parameters; a new mask is installed on every rank alike."""

    def __init__(self, layer: Any, module: nn.Module, name: str, slots: "DeepSpeedSlots", comm: Any):
        self.module, self.name, self.slots, self.comm = module, name, slots, comm
        self.reduce_gradient = None
        world, rank = comm.world_size, comm.rank
        self.chunk = -(-layer.numel // world)
        offset = min(rank * self.chunk, layer.numel)
        numel = min(self.chunk, layer.numel - offset)
        device = self.values.ds_tensor.device
        Shard.__init__(self, layer, offset, numel, device)
        self.mask = self.mask_from_positions()
        self.capture_dense_gradient(False)

    def _full_positions(self) -> torch.Tensor:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        positions = self.scatter.positions
        if getattr(positions, "ds_status", None) == ZeroParamStatus.AVAILABLE:
            # Gathered already (inside the layer's backward): a GatheredParameters here would
            # re-partition it on exit, under the autograd graph that still reads it.
            return positions.detach().long().clone()
        with deepspeed.zero.GatheredParameters([positions], modifier_rank=None):
            return positions.detach().long().clone()

    def _in_range(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions >= self.offset) & (positions < self.offset + self.numel)

    def mask_from_positions(self) -> torch.Tensor:
        positions = self._full_positions()
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        mask[positions[self._in_range(positions)] - self.offset] = True
        return mask

    def precise_weight(self) -> torch.Tensor:
        positions = self._full_positions()
        values = self.slots.precise_values(self.values).to(self.device)
        inside = self._in_range(positions)
        dense = torch.zeros(self.numel, dtype=values.dtype, device=self.device)
        dense[positions[inside] - self.offset] = values[inside.to(values.device)]
        return dense

    def _receive(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """The layer's local dense gradient, reduced over the ranks and cut to this rank's range
        (every rank runs the same backward, so these collectives meet in the same order)."""
        g = grad.detach().reshape(-1).clone()
        self.comm.all_reduce_sum(g)
        part = g[self.offset : self.offset + self.numel].mul_(1.0 / self.comm.world_size).to(self.device)
        del g
        if self._dense_grad is None:
            self._dense_grad = part.clone()
        else:
            self._dense_grad += part
        del part
        return self._select_in_backward(grad)

    def optimizer_states(self) -> List[torch.Tensor]:
        return []

    def _whole(self, part: torch.Tensor) -> torch.Tensor:
        """Every rank's range of a layer-wide bool tensor, assembled (as packed bits on the wire)."""
        padded = torch.zeros(self.chunk, dtype=torch.bool, device=part.device)
        padded[: part.numel()] = part
        rows = self.comm.all_gather_rows(bits.pack(padded))
        whole = torch.cat([bits.unpack(r, self.chunk) for r in rows])
        return whole[: self.layer.numel]

    def install_mask(self, new, grown, dropped, grow_values) -> None:
        import deepspeed

        grown_all, dropped_all = self._whole(grown), self._whole(dropped)
        positions = self.scatter.positions
        with deepspeed.zero.GatheredParameters([positions], modifier_rank=0):
            full = positions.data
            slots, born = self._moves(grown_all, dropped_all, full)
            full[slots.to(full.device)] = born.to(full.device, full.dtype)
        new_values = torch.zeros(born.numel(), dtype=torch.float32) if grow_values is None else grow_values(born)
        self.slots.write(self.values, slots, new_values)
        self.mask = new


def replace_params(params: Any, replaced: Dict[int, nn.Parameter]) -> Any:
    """A parameter list (or list of param-group dicts) handed to DeepSpeed, with packed weights
    replaced by their values; a generator is left alone (it reads the packed model when iterated)."""
    if not isinstance(params, (list, tuple)):
        return params
    out = []
    for p in params:
        if isinstance(p, dict):
            out.append({**p, "params": [replaced.get(id(q), q) for q in p["params"]]})
        else:
            out.append(replaced.get(id(p), p))
    return type(params)(out)


__all__ = ["DeepSpeedSlots", "PackedLayout", "ScatterToDense", "pack_before_engine", "refuse_packed", "replace_params"]
