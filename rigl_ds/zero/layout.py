"""The one owner of ZeRO internals: which layout an engine uses, where each rank's slice of every
masked weight lives (the shard views of ``views.py``), and how to keep DeepSpeed's own tensors in
step with the masks.

``SparseEngine`` calls the same methods at every stage and never asks which layout it has:

- ``read_compact_masters()``: magnitude ranking reads the fp32 masters a compact optimizer keeps;
- ``stepped_shards()``: the shards whose flat storage a step of the torch optimizer just updated;
- ``link_optimizer_state()`` after each optimizer step, ``relink_optimizer_state()`` after a load;
- ``repack_optimizer_state()``: compact state for the masks now in force, per flat storage;
- ``refresh_low_precision()``: low-precision copies written back after the masks changed.

The layouts: ``"whole"`` (ZeRO-0: the parameter itself, or with bf16 a whole fp32 copy of it),
``"fragments"`` (ZeRO-1/2 and stage-0 bf16's BF16_Optimizer: hp fragments of flat fp32 partitions)
and ``"stage3"`` (ZeRO-3 partitions).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..compact import LAYOUT_KEYS
from ..masks import any_non_finite
from ..plan import SparsityPlan
from ..shards import Collectives, LocalCollectives, Shard
from .views import HpFragmentShard, Stage0Shard, Stage3Shard, UnfusedMasterShard


class ZeroLayout:
    """This rank's shards under one ZeRO layout, and what that layout needs done around a step."""

    name: str = ""

    def __init__(self, engine: Any, shards: List[Shard], comm: Collectives):
        self.engine = engine
        self.shards = shards
        self.comm = comm

    @property
    def basic_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer ZeRO drives (its ``param_groups`` hold the flat fp32 storages)."""
        return self.engine.basic_optimizer

    def storage_groups(self) -> List[Tuple[torch.Tensor, List[Shard]]]:
        """The flat tensors the torch optimizer steps that hold masked entries here, each with the
        non-empty shards inside it, in shard order."""
        by_storage: Dict[int, Tuple[torch.Tensor, List[Shard]]] = {}
        for s in self.shards:
            storage = s.storage
            if storage is None or s.numel == 0:
                continue
            by_storage.setdefault(id(storage), (storage, []))[1].append(s)
        return list(by_storage.values())

    def stepped_shards(self) -> List[Shard]:
        """The shards whose storage is in the torch optimizer's ``param_groups``: what a step of it
        just updated, so what must be re-masked before DeepSpeed copies it to low precision."""
        stepped = {id(p) for group in self.basic_optimizer.param_groups for p in group["params"]}
        return [s for s in self.shards if id(s.storage) in stepped]  # a fragment-less shard's storage is None

    def read_compact_masters(self) -> None:
        """Compact master weights: the optimizer (a ``rigl_ds.compact`` one) keeps the fp32 values of
        active entries and DeepSpeed's storage is bf16; magnitude ranking reads the former."""
        for s in self.shards:
            if s.storage is not None:
                s.compact_masters = self.basic_optimizer

    def repack_optimizer_state(self) -> None:
        """Compact optimizer state: every flat storage holding masked entries keeps moments for its
        unmasked entries (other parameters, padding) and its active masked entries only. Runs
        whenever the masks change, before the next optimizer step."""
        for storage, shards in self.storage_groups():
            keep = torch.ones(storage.numel(), dtype=torch.bool, device=storage.device)
            for s in shards:
                keep.narrow(0, s.storage_offset, s.numel).copy_(s.mask)
            self.basic_optimizer.set_stateful(storage, keep)

    def link_optimizer_state(self) -> None:
        """After each optimizer step: make optimizer state created by it visible through the views."""

    def relink_optimizer_state(self) -> None:
        """After a checkpoint load replaced the optimizer's state tensors."""

    def refresh_low_precision(self) -> None:
        """After the masks changed outside DeepSpeed's step: low-precision copies must show them.
        The shard views write them directly (``extra_copies``) unless the layout says otherwise."""

    def after_load(self) -> None:
        """After a checkpoint load restored masks and DeepSpeed's state: check they agree."""

    def arm(self, controller: Any) -> None:
        """Before each step's backward: what the coming step needs captured (packed storage's
        dense gradients); nothing for masked storage, whose gradients are dense already."""

    # -- DeepSpeed's step signals -------------------------------------------------------------
    def gradients_overflow(self) -> bool:
        """Whether DeepSpeed's step will find non-finite gradients (and skip, where its optimizer
        checks): any non-finite gradient of any parameter on any data-parallel rank, not only of
        masked layers. Layouts whose DeepSpeed optimizer has its own check use that one."""
        grads = [p.grad for p in self.engine.module.parameters()]
        grads += list(getattr(self.engine.optimizer, "fp32_groups_gradients_flat", None) or ())
        return any_non_finite(grads, self.comm, torch.device("cpu"))

    def gradients_masked(self) -> None:
        """After the masked entries' gradients were zeroed, before DeepSpeed's step. With the
        optimizer offloaded, ZeRO-1/2/3 take each parameter's gradient norm during backward
        (``norm_for_param_grads``), before the masks applied, and gradient clipping sums those: take
        the masked layers' norms again from the masked gradients, so clipping sees the sparse
        model's norm as it does without offload."""
        opt = self.engine.optimizer
        norms = getattr(opt, "norm_for_param_grads", None)
        if not norms:
            return
        from deepspeed.runtime.zero.utils import get_norm_dtype

        for s in self.shards:
            param = getattr(s, "param", None)
            if param is None:
                continue
            key = opt.get_param_id(param)
            if key not in norms:
                continue
            g = s.grad()
            if g is not None:
                norms[key] = g.to(get_norm_dtype()).norm(2)

    def gradient_scale(self) -> float:
        """The factor the gradients seen before DeepSpeed's step carry: its fp16 loss scale."""
        if not self.engine.fp16_enabled():
            return 1.0
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)


class WholeLayout(ZeroLayout):
    """ZeRO-0: every rank holds whole parameters (fp32), or whole fp32 masters of bf16 ones."""

    name = "whole"


class FragmentLayout(ZeroLayout):
    """ZeRO-1/2 and BF16_Optimizer: each rank's hp fragments of flat fp32 partitions."""

    name = "fragments"

    def __init__(self, engine: Any, shards: List[Shard], comm: Collectives):
        super().__init__(engine, shards, comm)
        self._states_linked = False

    def link_optimizer_state(self) -> None:
        """ZeRO-1/2 and BF16_Optimizer link each parameter's optimizer-state fragments once, right
        after their first step, even when that step did nothing (a skipped RigL update step, when
        no state exists yet): they would never see the state created later. Link again once the
        torch optimizer has state."""
        if self._states_linked:
            return
        # Compact state records its stateful set before the first step: that is not state to link.
        if not any(key not in LAYOUT_KEYS for state in self.basic_optimizer.state.values() for key in state):
            return
        self._relink()
        self._states_linked = True

    def relink_optimizer_state(self) -> None:
        self._states_linked = False  # loading replaced the optimizer's state tensors: link the new ones
        self.link_optimizer_state()

    def repack_optimizer_state(self) -> None:
        super().repack_optimizer_state()
        if self._states_linked:
            self._relink()  # so that no fragment view holds a freed dense moment

    def refresh_low_precision(self) -> None:
        """Each rank's low-precision copy of a whole parameter holds other ranks' fragments: re-copy
        fp32 into low precision and all-gather."""
        self.engine.optimizer.update_lp_params()

    def _relink(self) -> None:
        self.engine.optimizer._hp_optimizer_states_linked = False
        self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def gradients_overflow(self) -> bool:
        """ZeRO-1/2's own check (the reduced gradient partitions, or the offload flag), when it has one."""
        check = getattr(self.engine.optimizer, "has_overflow", None)
        if check is None:
            return super().gradients_overflow()
        return bool(check(partition_gradients=getattr(self.engine.optimizer, "partition_gradients", True)))


class Stage3Layout(ZeroLayout):
    """ZeRO-3: each rank's slice of every partitioned parameter, padding excluded."""

    name = "stage3"

    @staticmethod
    def share_master(engine: Any) -> None:
        """ZeRO-3 with bf16 master weights means to step the bf16 partition itself (stage3.py keeps no
        second copy when the dtypes and devices match), but DeepSpeed 0.19 compares a device string with
        a torch.device there, so it always keeps a bf16 copy. With the fp32 masters in the optimizer
        that copy is only 2 bytes per parameter of waste: step the partition itself, as DeepSpeed
        intends. Call before the shards are made."""
        opt = engine.optimizer
        lps = getattr(opt, "fp16_partitioned_groups_flat", None)
        hps = getattr(opt, "fp32_partitioned_groups_flat", None)
        if lps is None or hps is None or getattr(opt, "offload_optimizer", False):
            return
        for i, (lp, hp) in enumerate(zip(lps, hps)):
            if hp is lp or hp.dtype != lp.dtype or hp.shape != lp.shape or hp.device != lp.device:
                continue
            if hp.grad is not None or engine.basic_optimizer.state.get(hp):
                continue  # already stepped: leave DeepSpeed's tensors as they are
            lp.ds_id = hp.ds_id  # the optimizer swapper and step key sub-groups by it
            hps[i] = lp

    def gradients_overflow(self) -> bool:
        """ZeRO-3's own check of the reduced gradient partitions. It clears the flag that its
        gradient reduction accumulates (kept for offload); keep it for DeepSpeed's own check."""
        opt = self.engine.optimizer
        tracker = getattr(opt, "inf_or_nan_tracker", None)
        saved = tracker.clone() if isinstance(tracker, torch.Tensor) else None
        overflow = bool(opt.has_overflow(partition_gradients=True))
        if saved is not None:
            opt.inf_or_nan_tracker.copy_(saved)
        return overflow

    def refresh_low_precision(self) -> None:
        """The shard views write each rank's partition, but two copies live on past it until
        DeepSpeed's next step (and an fp16 overflow step skips that): persistent parameters (at or
        under ``stage3_param_persistence_threshold``) stay gathered, and hpZ keeps secondary
        partitions. Re-gather the former, drop the latter, after any mask write outside the step."""
        opt = self.engine.optimizer
        masked = {id(s.param) for s in self.shards if getattr(s, "param", None) is not None}
        # The partitions were written on the current stream; the next forward all-gathers them on
        # DeepSpeed's own all-gather stream without waiting for it (cluster-review C6). Mask writes
        # outside the step are rare (initialisation, loads, after-step updates): let them finish.
        written = next((s.param.ds_tensor for s in self.shards if getattr(s, "param", None) is not None), None)
        if written is not None and written.is_cuda:
            torch.cuda.current_stream(written.device).synchronize()
        persistent = [p for p in getattr(opt, "persistent_parameters", ()) if id(p) in masked]
        if persistent:
            # all_gather skips parameters it holds gathered: release the stale copies first (partition()
            # of an unchanged parameter frees the gathered tensor and writes nothing back).
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)
        invalidate = getattr(opt, "invalidate_secondary_tensor", None)
        if invalidate is not None:
            invalidate()


def zero_layout(
    engine: Any, plan: SparsityPlan, weights: Dict[str, torch.nn.Parameter], compact_master_weights: bool = False
) -> ZeroLayout:
    """The layout of ``engine``'s ZeRO stage and optimizer, with this rank's shard of every masked
    layer (empty where it holds none) and the collectives they agree through. With
    ``compact_master_weights`` (a compact optimizer keeps the fp32 masters), ZeRO-3 steps its bf16
    partition itself."""
    from ..select import ShardedCollectives

    stage = engine.zero_optimization_stage()
    optimizer = engine.optimizer
    group = getattr(optimizer, "dp_process_group", None)
    if stage == 3:
        if compact_master_weights:
            Stage3Layout.share_master(engine)
        comm = ShardedCollectives(group)
        shards: List[Shard] = [Stage3Shard(layer, weights[layer.name], optimizer, comm.rank) for layer in plan.layers]
        return Stage3Layout(engine, shards, comm)
    params = [weights[layer.name] for layer in plan.layers]
    if any(hasattr(p, "_hp_mapping") for p in params):
        comm = ShardedCollectives(group)
        device = params[0].device
        shards = [HpFragmentShard(layer, weights[layer.name], optimizer, device) for layer in plan.layers]
        return FragmentLayout(engine, shards, comm)
    basic = engine.basic_optimizer
    if stage == 0 and optimizer is basic:
        shards = [Stage0Shard(layer, weights[layer.name], basic) for layer in plan.layers]
        return WholeLayout(engine, shards, LocalCollectives())
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
        return WholeLayout(engine, shards, LocalCollectives())
    from ..config import RigLConfigError

    if stage == 0 and engine.fp16_enabled():
        raise RigLConfigError(
            f"fp16 with zero_optimization.stage 0 and DeepSpeed's {type(optimizer).__name__} (a FusedAdam, e.g. "
            'from an "optimizer" block, keeps flat fp32 masters rigl_ds has no view of) is not supported; use '
            "zero_optimization.stage 1, 2 or 3, bf16, or pass a torch optimizer (optimizer=...)"
        )
    raise NotImplementedError(
        f"rigl_ds: no mask layout for ZeRO stage {stage} with DeepSpeed's {type(optimizer).__name__} "
        "(supported: stage 0 fp32, bf16 or fp16 with a torch optimizer; stages 1-3)"
    )


__all__ = ["ZeroLayout", "WholeLayout", "FragmentLayout", "Stage3Layout", "zero_layout"]
