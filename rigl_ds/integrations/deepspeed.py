"""``rigl_ds.initialize``: ``deepspeed.initialize`` plus the ``"rigl"`` block of the same config.

The user's loop does not change (``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``).
On each optimizer step (the gradient-accumulation boundary) the engine's ``step`` first runs the
sparse controller on the reduced gradients (masking them, so clipping sees the sparse model's
norm, and updating masks on update steps), then DeepSpeed's own step, whose torch optimizer is
wrapped to skip the step where the config says so and to zero masked fp32 entries right after it,
before DeepSpeed copies them into the low-precision weights.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch

from ..compact import LAYOUT_KEYS, CompactAdam, CompactOptimizer, CompactSGD
from ..config import RigLConfig, RigLConfigError, load_config
from ..controller import SparseController
from ..layers import find_sparse_weights, global_shape
from ..masks import apply_masks
from ..plan import build_plan
from ..shards import Shard

logger = logging.getLogger("rigl_ds")


def _ds_config_dict(config: Any, args: Any) -> Optional[Dict[str, Any]]:
    """The DeepSpeed config as a dict, from whichever place deepspeed.initialize would read it."""
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if isinstance(config, dict):
        return config
    raise RigLConfigError(f"DeepSpeed config must be a dict or a JSON path, got {type(config).__name__}")


def initialize(*args: Any, total_steps: Optional[int] = None, **kwargs: Any):
    """Same arguments and return values as ``deepspeed.initialize``. With a ``"rigl"`` block in
    the config, the returned engine trains sparse; without one it is DeepSpeed's engine untouched.

    ``total_steps`` (optimizer steps) is needed only when the block ends updates by
    ``end_fraction`` rather than ``end_step``."""
    import deepspeed

    model = kwargs.get("model", args[1] if len(args) > 1 else None)
    config = _ds_config_dict(
        kwargs.get("config", kwargs.get("config_params")), kwargs.get("args", args[0] if args else None)
    )
    block = None if config is None else config.get("rigl")
    if block is not None:
        # Validate the block, and its patterns against the model, before DeepSpeed builds anything.
        rigl_config = load_config(block)
        if model is None:
            raise ValueError("rigl_ds.initialize needs the model (model=...)")
        _plan_for(model, rigl_config)
        if rigl_config.compact_optimizer_state:
            args, kwargs = _with_compact_optimizer(args, kwargs, config, rigl_config.compact_master_weights)
    out = deepspeed.initialize(*args, **kwargs)
    if block is None:
        return out
    engine = out[0]
    SparseEngine(engine, rigl_config, total_steps)
    return out


class SparseEngine:
    """Masks, schedule and updates attached to one DeepSpeed engine (``engine.rigl``)."""

    def __init__(self, engine, config: RigLConfig, total_steps: Optional[int] = None):
        from ..zero import zero_shards

        self.engine = engine
        self.config = config
        self._states_linked = False
        if config.compact_master_weights:
            _share_stage3_master(engine)
        weights, self.plan = _plan_for(engine.module, config)
        self.shards, self.comm, self.layout = zero_shards(engine, self.plan, weights)
        self.controller = SparseController(config, self.plan, self.shards, self.comm, total_steps)
        if config.compact_optimizer_state:
            if not isinstance(engine.basic_optimizer, CompactOptimizer):
                raise RigLConfigError(
                    "rigl.compact_optimizer_state: DeepSpeed's optimizer is "
                    f"{type(engine.basic_optimizer).__name__}, not a rigl_ds.compact optimizer"
                )
            self.controller.mask_listeners.append(self._repack_optimizer_state)
            if config.compact_master_weights:
                basic = engine.basic_optimizer
                for s in self.shards:
                    if getattr(s, "storage", None) is not None:
                        s.master_source = lambda s: basic.master_range(s.storage, s.storage_offset, s.numel)
        self.controller.initialize_masks()
        self._refresh_low_precision()
        self._skip_optimizer = False
        self._engine_step = engine.step
        self._basic = engine.basic_optimizer
        self._basic_step = self._basic.step
        engine.step = self.step
        self._basic.step = self._wrapped_basic_step
        self._save, self._load = engine.save_checkpoint, engine.load_checkpoint
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        engine.rigl = self

    # -- the step ------------------------------------------------------------------------------
    def step(self, *args: Any, **kwargs: Any):
        engine = self.engine
        if not engine.is_gradient_accumulation_boundary():
            return self._engine_step(*args, **kwargs)
        run = self.controller.before_step()
        self._skip_optimizer = not run
        try:
            out = self._engine_step(*args, **kwargs)
        finally:
            self._skip_optimizer = False
        self._link_optimizer_state()
        updates_before = len(self.controller.history)
        self.controller.after_step(run)
        if len(self.controller.history) != updates_before:
            self._refresh_low_precision()  # masks changed after DeepSpeed copied fp32 to low precision
        return out

    def _wrapped_basic_step(self, *args: Any, **kwargs: Any):
        if self._skip_optimizer:
            # A deliberate skip (RigL update step): as in the plain path, keep torch's LR scheduler
            # from warning that it stepped before the optimizer, which it keys on this flag.
            self._basic._opt_called = True
            return None
        out = self._basic_step(*args, **kwargs)
        stepped = {id(p) for group in self._basic.param_groups for p in group["params"]}
        apply_masks([s for s in self.shards if _storage_id(s) in stepped])
        return out

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2 and BF16_Optimizer link each parameter's optimizer-state fragments once, right
        after their first step, even when that step did nothing (a skipped RigL update step, when
        no state exists yet): they would never see the state created later. Link again once the
        torch optimizer has state."""
        if self.layout != "fragments" or self._states_linked:
            return
        # Compact state records its stateful set before the first step: that is not state to link.
        if not any(key not in LAYOUT_KEYS for state in self._basic.state.values() for key in state):
            return
        self.engine.optimizer._hp_optimizer_states_linked = False
        self.engine.optimizer._lazy_init_hp_params_optimizer_state()
        self._states_linked = True

    def _repack_optimizer_state(self) -> None:
        """Compact optimizer state: every flat fp32 tensor holding masked fragments keeps moments for
        its unmasked entries (other parameters, padding) and its active masked entries only. Runs
        whenever the masks change, before the next optimizer step."""
        by_storage: Dict[int, Any] = {}
        for s in self.shards:
            storage = getattr(s, "storage", None)
            if storage is None or s.numel == 0:
                continue
            by_storage.setdefault(id(storage), (storage, []))[1].append(s)
        for storage, shards in by_storage.values():
            keep = torch.ones(storage.numel(), dtype=torch.bool, device=storage.device)
            for s in shards:
                keep.narrow(0, s.storage_offset, s.numel).copy_(s.mask)
            self.engine.basic_optimizer.set_stateful(storage, keep)
        if self.layout == "fragments" and self._states_linked:
            # Re-link DeepSpeed's fragment views so none holds a freed dense moment.
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def _refresh_low_precision(self) -> None:
        """Low-precision copies must show the masks: ZeRO-3 and stage 0 wrote them through the
        shard views; ZeRO-1/2 and BF16_Optimizer re-copy and all-gather (each rank's copy of the
        whole parameter holds other ranks' fragments)."""
        if self.layout == "fragments":
            self.engine.optimizer.update_lp_params()

    # -- reporting --------------------------------------------------------------------------------
    def layer_report(self) -> List[Dict[str, Any]]:
        return self.controller.layer_report()

    @property
    def history(self):
        return self.controller.history

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, *args: Any, **kwargs: Any):
        if tag is None:
            tag = f"global_step{self.engine.global_steps}"  # DeepSpeed's own default
        out = self._save(save_dir, tag, *args, **kwargs)
        path = os.path.join(save_dir, str(tag), "rigl_ds")
        os.makedirs(path, exist_ok=True)
        state = self.controller.state_dict()
        state["ranges"] = {s.layer.name: (s.offset, s.numel) for s in self.shards}
        state["shapes"] = {s.layer.name: tuple(s.layer.shape) for s in self.shards}
        state["world_size"] = self.comm.world_size
        torch.save(state, os.path.join(path, f"rank{self.comm.rank:05d}.pt"))
        _barrier()
        return out

    def load_checkpoint(self, load_dir, tag=None, *args: Any, **kwargs: Any):
        load_path, client_state = self._load(load_dir, tag, *args, **kwargs)
        if load_path is None:
            return load_path, client_state
        tag_dir = os.path.dirname(load_path)
        folder = os.path.join(tag_dir, "rigl_ds")
        if not os.path.isdir(folder) and tag_dir.endswith("_universal"):
            # ds_to_universal writes a new folder beside the original and does not copy ours.
            folder = os.path.join(tag_dir.removesuffix("_universal"), "rigl_ds")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{tag_dir} has no rigl_ds state: not saved by a rigl_ds engine")
        own = os.path.join(folder, f"rank{self.comm.rank:05d}.pt")
        self._states_linked = False  # loading replaced the optimizer's state tensors: link the new ones
        self._link_optimizer_state()
        template = own if os.path.isfile(own) else os.path.join(folder, sorted(os.listdir(folder))[0])
        state = torch.load(template, map_location="cpu", weights_only=False)
        if state.get("ranges") != {s.layer.name: (s.offset, s.numel) for s in self.shards}:
            state = _reslice(folder, self.shards, state)  # another world size or layout: cut our ranges
        self.controller.load_state_dict(state)
        self._refresh_low_precision()
        return load_path, client_state


def _with_compact_optimizer(args: tuple, kwargs: Dict[str, Any], config: Dict[str, Any], master_weights: bool):
    """``deepspeed.initialize``'s arguments with the client optimizer as a compact one: a torch
    Adam / AdamW / SGD is converted (same groups and hyper-parameters), a compact one passes as it is.
    ``master_weights``: the optimizer keeps fp32 masters of active entries, and DeepSpeed's master
    weights and gradients go to bf16 (ZeRO-3 then shares them with the bf16 partition)."""
    needed: Dict[str, Any] = {}
    if master_weights:
        bf16 = config.get("bf16", {})
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if not bf16.get("enabled", False) or stage not in (1, 2, 3):
            raise RigLConfigError(
                "rigl.compact_master_weights: needs bf16 training under ZeRO stage 1, 2 or 3 "
                f'("bf16": {{"enabled": true}}, "zero_optimization": {{"stage": 1|2|3}}); got bf16 '
                f"{bf16.get('enabled', False)}, stage {stage}"
            )
        offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
        if offload.get("device", "none") not in ("none", None):
            raise RigLConfigError(
                "rigl.compact_master_weights: not with zero_optimization.offload_optimizer (DeepSpeed then "
                "requires its own DeepSpeedCPUAdam for bf16 master weights); compact_optimizer_state alone "
                "works with offload"
            )
        if config.get("gradient_accumulation_steps", 1) not in (1, "auto"):
            logger.warning(
                "rigl.compact_master_weights: DeepSpeed accumulates gradients in bf16 in this mode, "
                "so with gradient_accumulation_steps > 1 results differ from an fp32-master run"
            )
        flags = {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
        if any(bf16.get(k) is not True for k in flags):
            needed["bf16"] = {**bf16, **flags}
    if "optimizer" in config:
        raise RigLConfigError(
            "rigl.compact_optimizer_state: needs a client optimizer (rigl_ds.compact.CompactAdam/CompactSGD "
            'or a torch.optim.Adam/AdamW/SGD), not a DeepSpeed "optimizer" block'
        )
    positional = "optimizer" not in kwargs and len(args) > 2
    optimizer = args[2] if positional else kwargs.get("optimizer")
    if not isinstance(optimizer, CompactOptimizer):
        convert = {torch.optim.Adam: CompactAdam, torch.optim.AdamW: CompactAdam, torch.optim.SGD: CompactSGD}
        if type(optimizer) not in convert:
            raise RigLConfigError(
                "rigl.compact_optimizer_state: the optimizer must be rigl_ds.compact.CompactAdam/CompactSGD or "
                f"a torch.optim.Adam/AdamW/SGD to convert, got {type(optimizer).__name__}"
            )
        try:
            optimizer = convert[type(optimizer)].from_torch(optimizer)
        except ValueError as exc:
            raise RigLConfigError(f"rigl.compact_optimizer_state: {exc}") from None
    optimizer.master_weights = master_weights
    if positional:
        args = args[:2] + (optimizer,) + args[3:]
    else:
        kwargs = {**kwargs, "optimizer": optimizer}
    if not config.get("zero_allow_untested_optimizer", False):
        needed["zero_allow_untested_optimizer"] = True  # ZeRO asks for it with client optimizers it does not know
    if needed:
        key = next((k for k in ("config", "config_params") if kwargs.get(k) is not None), None)
        if key is None:
            raise RigLConfigError(
                f"rigl.compact_optimizer_state: add {json.dumps(needed)} to the DeepSpeed config, or pass "
                "config=... so that rigl_ds can"
            )
        kwargs = {**kwargs, key: {**config, **needed}}
    return args, kwargs


def _share_stage3_master(engine) -> None:
    """ZeRO-3 with bf16 master weights means to step the bf16 partition itself (stage3.py keeps no
    second copy when the dtypes and devices match), but DeepSpeed 0.19 compares a device string with a
    torch.device there, so it always keeps a bf16 copy. With the fp32 masters in the optimizer that
    copy is only 2 bytes per parameter of waste: step the partition itself, as DeepSpeed intends."""
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


def _plan_for(model: torch.nn.Module, config: RigLConfig):
    try:
        weights = find_sparse_weights(model, config.modules)
        return weights, build_plan(config, {n: global_shape(p) for n, p in weights.items()})
    except ValueError as exc:
        raise RigLConfigError(str(exc)) from None


def _reslice(folder: str, shards: List[Shard], template: Dict[str, Any]) -> Dict[str, Any]:
    """Masks and per-entry method state for this rank's ranges, cut from every saved rank's
    ranges (a checkpoint from another world size or layout). One saved file in memory at a time."""
    masks = {s.layer.name: torch.zeros(s.numel, dtype=torch.bool) for s in shards}
    method: Dict[str, torch.Tensor] = {}
    files = sorted(f for f in os.listdir(folder) if f.startswith("rank") and f.endswith(".pt"))
    for f in files:
        saved = torch.load(os.path.join(folder, f), map_location="cpu", weights_only=False)
        for s in shards:
            start, numel = saved["ranges"][s.layer.name]
            lo, hi = max(start, s.offset), min(start + numel, s.offset + s.numel)
            if lo >= hi:
                continue
            masks[s.layer.name][lo - s.offset : hi - s.offset] = saved["masks"][s.layer.name][lo - start : hi - start]
            for key, value in saved["method_state"].items():
                if key.endswith("." + s.layer.name) and value.numel() == numel:
                    dest = method.setdefault(key, torch.zeros(s.numel, dtype=value.dtype))
                    dest[lo - s.offset : hi - s.offset] = value[lo - start : hi - start]
    state = dict(template)
    state["masks"] = masks
    state["method_state"] = method
    return state


def _storage_id(shard: Shard) -> Optional[int]:
    storage = getattr(shard, "storage", None)
    return None if storage is None else id(storage)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
