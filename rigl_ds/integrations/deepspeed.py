"""``rigl_ds.initialize``: ``deepspeed.initialize`` plus the ``"rigl"`` block of the same config.

The user's loop does not change (``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``, or
a pipeline's ``engine.train_batch()``). On each optimizer step the engine's ``_take_model_step`` (the
one point every mode passes once per optimizer step: managed or unmanaged gradient accumulation,
pipeline parallelism) first runs the sparse controller on the reduced gradients (masking them, so
clipping sees the sparse model's norm, and updating masks on update steps), then DeepSpeed's own
step, whose torch optimizer is wrapped to skip the step where the config says so and to zero masked
fp32 entries right after it, before DeepSpeed copies them into the low-precision weights.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch

from .. import checkpoint, faults, rank_exit
from ..adapter import UpdateWatch, mark_step_skipped, plan_for_model, start_controller
from ..compact import CompactAdam, CompactOptimizer, CompactSGD
from ..config import RigLConfig, RigLConfigError, load_config
from ..masks import keep_active

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


def initialize(*args: Any, total_steps: Optional[int] = None, defer_total_steps: bool = False, **kwargs: Any):
    """Same arguments and return values as ``deepspeed.initialize``. With a ``"rigl"`` block in
    the config, the returned engine trains sparse; without one it is DeepSpeed's engine untouched.

    ``total_steps`` (optimizer steps) is needed only when the block ends updates by
    ``end_fraction`` rather than ``end_step``; without it, a DeepSpeed ``"scheduler"`` block's
    ``total_num_steps`` (or the passed scheduler's) is used. ``defer_total_steps``: if neither is
    known, wait for ``engine.rigl.controller.set_total_steps`` instead of failing here (the first
    optimizer step fails if it never comes)."""
    from .autopatch import original_initialize, total_steps_from

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
        _refuse_unsupported(config, model, kwargs.get("mpu", args[7] if len(args) > 7 else None))
        if rigl_config.storage == "packed":
            from ..zero.packed import refuse_packed

            refuse_packed(config, model, rigl_config)
        plan_for_model(model, rigl_config)
        if total_steps is None:
            total_steps = total_steps_from(config, kwargs.get("lr_scheduler", args[5] if len(args) > 5 else None))
        if not defer_total_steps:
            rigl_config.resolve_end_step(total_steps)  # fail before DeepSpeed builds anything
        if rigl_config.compact_optimizer_state:
            args, kwargs = _with_compact_optimizer(args, kwargs, config, rigl_config.compact_master_weights)
        if rigl_config.storage == "packed":
            args, kwargs = _packed_before_engine(args, kwargs, model, rigl_config, total_steps, config)
    out = original_initialize()(*args, **kwargs)
    if block is None:
        return out
    engine = out[0]
    if getattr(engine, "optimizer", None) is None:
        # An engine built for evaluation or inference only (no optimizer) takes no step: nothing to sparsify.
        logger.info("rigl_ds: the engine has no optimizer (inference only); the rigl block does not apply to it")
        return out
    SparseEngine(engine, rigl_config, total_steps, defer_total_steps=defer_total_steps)
    return out


class SparseEngine:
    """Masks, schedule and updates attached to one DeepSpeed engine (``engine.rigl``)."""

    def __init__(
        self, engine, config: RigLConfig, total_steps: Optional[int] = None, defer_total_steps: bool = False
    ):
        from ..zero import zero_layout

        # Engines built elsewhere (HF Trainer, accelerate) reach here without rigl_ds.initialize's check.
        _refuse_storage(config, engine.module)
        _refuse_unsupported(_engine_config(engine), engine.module, getattr(engine, "mpu", None))
        self.engine = engine
        self.config = config
        if config.storage == "packed":
            from ..zero.packed import PackedLayout

            self.plan = engine.module._rigl_packed_plan
            self.zero = PackedLayout(engine, self.plan)
        else:
            weights, self.plan = plan_for_model(engine.module, config)
            # Everything that knows where ZeRO keeps this rank's slices, and how to write them back.
            self.zero = zero_layout(engine, self.plan, weights, compact_master_weights=config.compact_master_weights)
        self.shards, self.comm = self.zero.shards, self.zero.comm
        repack = None
        if config.compact_optimizer_state:
            if not isinstance(engine.basic_optimizer, CompactOptimizer):
                raise RigLConfigError(
                    "rigl.compact_optimizer_state: DeepSpeed's optimizer is "
                    f"{type(engine.basic_optimizer).__name__}, not a rigl_ds.compact optimizer"
                )
            repack = self.zero.repack_optimizer_state
            if config.compact_master_weights:
                self.zero.read_compact_masters()
        self.controller = start_controller(
            config,
            self.plan,
            self.shards,
            self.comm,
            total_steps,
            defer_total_steps=defer_total_steps,
            on_masks_changed=repack,
            # Packed values sit at the initial masks already (chosen when the model was packed).
            masks_from_storage=config.storage == "packed",
        )
        # DeepSpeed's own overflow check and loss scale, so rigl_ds skips exactly the steps it skips.
        self.controller.overflow_check = self.zero.gradients_overflow
        self.controller.gradient_scale = self.zero.gradient_scale
        self.zero.refresh_low_precision()
        self.zero.arm(self.controller)
        self._skip_optimizer = False
        # Not engine.step: PipelineEngine.train_batch calls _take_model_step itself, and without
        # managed gradient accumulation step() is a boundary only while it runs. _take_model_step
        # runs once per optimizer step in every mode, after the gradients are reduced.
        self._engine_take_model_step = engine._take_model_step
        self._basic = engine.basic_optimizer
        self._basic_step = self._basic.step
        self._preserves_zeros = preserves_zeros(self._basic)
        engine._take_model_step = self._take_model_step
        self._basic.step = self._wrapped_basic_step
        self._save, self._load = engine.save_checkpoint, engine.load_checkpoint
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        engine.rigl = self
        if rank_exit.uses_gloo():
            rank_exit.install_exit_grace()  # see rigl_ds/rank_exit.py: gloo threads at interpreter exit

    @property
    def layout(self) -> str:
        """``"whole"``, ``"fragments"`` or ``"stage3"``: which ZeRO layout the masks are views of."""
        return self.zero.name

    # -- the step ------------------------------------------------------------------------------
    def _take_model_step(self, *args: Any, **kwargs: Any):
        """DeepSpeed's optimizer step (clipping, optimizer, LR scheduler, step counters) with the
        controller around it: masks gradients and updates masks before, re-masks after. A step
        DeepSpeed skips for an overflow is one rigl_ds skips too (no update, no schedule advance)."""
        updated = UpdateWatch(self.controller)
        run = self.controller.before_step()
        if run:
            self.zero.gradients_masked()
        self._skip_optimizer = not run
        faults.maybe_fail("mid-step", self.controller.step)
        try:
            out = self._engine_take_model_step(*args, **kwargs)
        finally:
            self._skip_optimizer = False
        self.zero.link_optimizer_state()
        # DeepSpeed's applied-step signal: False when its loss scaler skipped the step (overflow).
        applied = bool(getattr(self.engine, "_step_applied", True))
        self.controller.after_step(
            run,
            applied=applied,
            mask_weights=False,  # _wrapped_basic_step masked them
            # An update here changes masks after DeepSpeed copied fp32 to low precision: part of the
            # update (inside the controller's update_listeners' "start"/"end"), only when one ran.
            after_update=self.zero.refresh_low_precision,
        )
        self.zero.arm(self.controller)
        if updated.changed():
            self._write_monitor()
        return out

    def _write_monitor(self) -> None:
        """``rigl/*`` figures of each mask update through DeepSpeed's own monitors (TensorBoard, CSV,
        W&B, as its config enables them), so a script that logs nothing itself still shows them."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not getattr(monitor, "enabled", False):
            return
        step = self.controller.last_update  # the step the update ran at
        monitor.write_events([(name, value, step) for name, value in self.controller.metrics().items()])

    def _wrapped_basic_step(self, *args: Any, **kwargs: Any):
        if self._skip_optimizer:
            mark_step_skipped(self._basic)  # a deliberate skip (RigL update step)
            return None
        out = self._basic_step(*args, **kwargs)
        if not self._preserves_zeros:
            # Only the fp32 masters: DeepSpeed copies them into the low-precision weights after this.
            for s in self.zero.stepped_shards():
                keep_active(s.weight, s.mask)
        return out

    # -- reporting --------------------------------------------------------------------------------
    def layer_report(self) -> List[Dict[str, Any]]:
        return self.controller.layer_report()

    @property
    def history(self):
        return self.controller.history

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, *args: Any, **kwargs: Any):
        """DeepSpeed's save, then every rank's rigl_ds state, its completeness record and only then
        ``latest`` (``rigl_ds.checkpoint.save``): a save cut short never becomes the latest. A
        pipeline's rank files are named by stage and data-parallel rank; the record waits for every stage."""
        from ..pipeline import pipeline_grid

        grid = pipeline_grid(self.engine.module)
        if tag is None:
            tag = f"global_step{self.engine.global_steps}"  # DeepSpeed's own default
        signature = inspect.signature(self._save)
        engine = getattr(self.engine, "checkpoint_engine", None)
        decoupled = bool(getattr(engine, "is_decoupled", lambda: False)())
        if "save_latest" in signature.parameters and not decoupled:
            bound = signature.bind(save_dir, tag, *args, **kwargs)
            bound.apply_defaults()
            ours, bound.arguments["save_latest"] = bool(bound.arguments["save_latest"]), False
            save_deepspeed = lambda: self._save(*bound.args, **bound.kwargs)  # noqa: E731
        else:
            # DeepSpeed commits its files (and writes ``latest``) later, or cannot be told not to.
            logger.warning("rigl_ds: DeepSpeed writes 'latest' itself here; it may precede the rigl_ds state")
            ours = False
            save_deepspeed = lambda: self._save(save_dir, tag, *args, **kwargs)  # noqa: E731
        # ZeRO-0 replicas: one writer (of each pipeline stage).
        first_replica = checkpoint.global_rank() == 0 if grid is None else grid.get_data_parallel_rank() == 0
        writes = self.comm.world_size > 1 or first_replica
        return checkpoint.save(
            save_dir,
            str(tag),
            self.controller.state_dict(),
            ranges={s.layer.name: (s.offset, s.numel) for s in self.shards},
            shapes={s.layer.name: tuple(s.layer.shape) for s in self.shards},
            rank=self.comm.rank,
            world_size=self.comm.world_size,
            writes=writes,
            save_latest=ours,
            save_deepspeed=save_deepspeed,
            record_deepspeed_files=not decoupled,
            stage=None if grid is None else grid.get_stage_id(),
            num_stages=None if grid is None else grid.get_pipe_parallel_world_size(),
        )

    def load_checkpoint(self, load_dir, tag=None, *args: Any, **kwargs: Any):
        self._refuse_pipeline_checkpoint(load_dir, tag, *args, **kwargs)
        # The rigl_ds part is verified, read and checked against this run before DeepSpeed replaces
        # any weight: a checkpoint rigl_ds would refuse leaves the engine as it was.
        state = self._read_rank_state(load_dir, tag)
        load_path, client_state = self._load(load_dir, tag, *args, **kwargs)
        if load_path is None:
            return load_path, client_state
        if state is None or os.path.dirname(load_path) != state["_tag_dir"]:
            tag_dir = os.path.dirname(load_path)
            state = self._read_rank_state(os.path.dirname(tag_dir), os.path.basename(tag_dir))
        self.zero.relink_optimizer_state()  # loading replaced the optimizer's state tensors
        state.pop("_tag_dir", None)
        self.controller.load_state_dict(state)
        self.zero.refresh_low_precision()
        self.zero.after_load()
        self.zero.arm(self.controller)
        return load_path, client_state

    def _read_rank_state(self, load_dir, tag) -> Optional[Dict[str, Any]]:
        """This rank's saved state for ``tag`` (``latest`` when None), checked against this run's
        config; None when the tag cannot be resolved here (DeepSpeed then reports it). A pipeline
        stage reads its own stage's files; another number of stages is refused
        (``checkpoint.CheckpointLayoutError``), as each stage's state belongs to the layers it held."""
        from ..pipeline import pipeline_grid

        if tag is None:
            latest = os.path.join(load_dir, checkpoint.LATEST)
            if not os.path.isfile(latest):
                return None
            with open(latest) as f:
                tag = f.read().strip()
        tag_dir = os.path.join(load_dir, str(tag))
        if not os.path.isdir(tag_dir):
            return None
        ranges = {s.layer.name: (s.offset, s.numel) for s in self.shards}
        grid = pipeline_grid(self.engine.module)
        stage = None if grid is None else grid.get_stage_id()
        num_stages = None if grid is None else grid.get_pipe_parallel_world_size()
        state = checkpoint.load_rank_state(tag_dir, self.comm.rank, ranges, stage=stage, num_stages=num_stages)
        self.controller.check_resume_config(state.get("config", {}))
        saved_world = state.get("world_size")
        if self.config.compact_optimizer_state and saved_world != self.comm.world_size:
            raise RigLConfigError(
                f"rigl.compact_optimizer_state: {tag_dir} was saved at world size {saved_world}; compact optimizer "
                f"state loads only at the world size it was saved at (this run: {self.comm.world_size})"
            )
        state["_tag_dir"] = tag_dir
        return state

    def _refuse_pipeline_checkpoint(self, load_dir, tag=None, *args: Any, **kwargs: Any) -> None:
        """What cannot work with a pipeline's checkpoint: resuming a ZeRO-0 bf16 pipeline. DeepSpeed runs
        such a pipeline with its BF16_Optimizer and, at stage 0, hands it the model-states file's state
        dict where it expects the per-rank list of ZeRO files (KeyError: 0 in
        ``BF16_Optimizer._load_legacy_checkpoint``, DeepSpeed 0.19.8); with ``load_optimizer_states=False``
        it leaves the fp32 masters as they were, so the next step overwrites the loaded weights. Only
        ``load_module_only=True`` (weights, which refreshes the masters) loads. Refused here, before
        anything is loaded; another number of stages is refused by ``_read_rank_state``."""
        from ..pipeline import pipeline_grid

        if pipeline_grid(self.engine.module) is None:
            return
        if self.engine.zero_optimization_stage() != 0 or not self.engine.bfloat16_enabled():
            return
        bound = inspect.signature(self._load).bind(load_dir, tag, *args, **kwargs)
        bound.apply_defaults()
        if not bound.arguments.get("load_module_only", False):
            import deepspeed

            raise NotImplementedError(
                "rigl_ds: a pipeline-parallel engine with bf16 at zero_optimization.stage 0 cannot resume from a "
                f"checkpoint: DeepSpeed {deepspeed.__version__} cannot load the BF16_Optimizer state it saved there "
                "(and without it keeps stale fp32 masters). Train with zero_optimization.stage 1 (or fp32) to "
                "resume; load_checkpoint(..., load_module_only=True) loads the weights and masks alone"
            )


# Optimizers whose step leaves an entry exactly zero when its gradient, its state and its weight are
# zero (Adam/AdamW: zero moments give a zero update, decoupled or L2 decay of zero is zero; SGD with
# momentum likewise). Masked entries enter every step that way (gradients masked before the step,
# weights and state zeroed whenever the masks change), so re-masking the weights after the step
# would be a pass over every masked weight that changes nothing. Any other optimizer is re-masked.
_ZERO_PRESERVING = (
    "torch.optim.adam.Adam",
    "torch.optim.adamw.AdamW",
    "torch.optim.sgd.SGD",
    "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam",
    "deepspeed.ops.adam.fused_adam.FusedAdam",
)


def preserves_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is one of the known zero-preserving types itself (not a subclass, whose
    step may differ)."""
    kind = type(optimizer)
    return f"{kind.__module__}.{kind.__qualname__}" in _ZERO_PRESERVING


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


# DeepSpeed's expert-parallel layers, by class path (no import needed to recognise them).
def _refuse_storage(config: RigLConfig, module: torch.nn.Module) -> None:
    """Packed storage replaces each masked weight by its active values before DeepSpeed builds its
    engine (``rigl_ds.initialize`` does); an engine built elsewhere (HF Trainer, accelerate) holds
    the dense weights already."""
    if config.storage == "packed" and getattr(module, "_rigl_packed_plan", None) is None:
        raise RigLConfigError(
            'rigl.storage: "packed" needs the model packed before DeepSpeed builds its engine, which '
            "rigl_ds.initialize (and a script run under `python -m rigl_ds.run`) does; the Hugging Face Trainer "
            'and accelerate paths build the engine themselves: use storage: "masked" there'
        )


def _packed_before_engine(args: tuple, kwargs: Dict[str, Any], model, config: RigLConfig, total_steps, ds_config):
    """Packs ``model`` (initial masks on its dense weights) and points the client optimizer and any
    parameter list DeepSpeed is handed at the packed values."""
    from ..zero.packed import pack_before_engine, replace_params

    args, kwargs = list(args), dict(kwargs)
    optimizer = kwargs.get("optimizer", args[2] if len(args) > 2 else None)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise RigLConfigError(
            'rigl.storage: "packed" needs a torch optimizer object (optimizer=...) or a DeepSpeed "optimizer" '
            f"block; got {type(optimizer).__name__}"
        )
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)
    replaced, plan = pack_before_engine(model, optimizer, config, total_steps, stage)
    model._rigl_packed_plan = plan  # what SparseEngine finds on engine.module
    if "model_parameters" in kwargs:
        kwargs["model_parameters"] = replace_params(kwargs["model_parameters"], replaced)
    elif len(args) > 3:
        args[3] = replace_params(args[3], replaced)
    return tuple(args), kwargs



_MOE_CLASSES = ("deepspeed.moe.layer.MoE", "deepspeed.module_inject.auto_ep_layer.AutoEPMoELayer")


def _refuse_unsupported(config: Optional[Dict[str, Any]], model: Optional[torch.nn.Module], mpu: Any) -> None:
    """Raises ``RigLConfigError`` naming the setting for the parallelisms rigl_ds does not handle:
    tensor parallelism (a weight cut across ranks that the data-parallel masks do not see), expert
    parallelism (expert weights reduced over other groups than the masks' collectives), NVMe
    offload (the fp32 masters and optimizer state the masks are views of are swapped out to disk)
    and partial optimizer offload (a second optimizer steps the GPU-resident sub-groups)."""
    config = config or {}
    autotp = (config.get("tensor_parallel") or {}).get("autotp_size") or 0
    if isinstance(autotp, int) and autotp > 1:
        raise RigLConfigError(
            f"tensor_parallel.autotp_size: {autotp} (tensor parallelism) is not supported by rigl_ds; "
            "allowed: 0 or 1 (no tensor parallelism)"
        )
    tensor_parallel = _tensor_parallel_size(mpu)
    if tensor_parallel > 1:
        raise RigLConfigError(
            f"mpu: model-parallel world size {tensor_parallel} (tensor parallelism) is not supported by rigl_ds; "
            "pass no mpu, or one whose model-parallel world size is 1"
        )
    if (config.get("expert_parallel") or {}).get("enabled"):
        raise RigLConfigError(
            "expert_parallel.enabled: true (DeepSpeed AutoEP expert parallelism) is not supported by rigl_ds"
        )
    zero = config.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device")
        if str(getattr(device, "value", device)).lower() == "nvme":
            raise RigLConfigError(
                f"zero_optimization.{key}.device: 'nvme' is not supported by rigl_ds (the masks are views of "
                "the fp32 masters and optimizer state it swaps to disk); allowed: 'none' or 'cpu'"
            )
    ratio = (zero.get("offload_optimizer") or {}).get("ratio", 1.0)
    if ratio is not None and float(ratio) < 1.0:
        raise RigLConfigError(
            f"zero_optimization.offload_optimizer.ratio: {ratio} (partial offload) is not supported by rigl_ds: "
            "ZeRO-3 steps the sub-groups kept on the GPU with a second optimizer that rigl_ds does not drive "
            "(they would step on update steps that skip the optimizer); allowed: 1.0"
        )
    if model is None:
        return
    for name, module in model.named_modules():
        paths = (f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__)
        path = next((p for p in paths if p in _MOE_CLASSES), None)
        if path is not None:
            raise RigLConfigError(
                f"model: {name!r} is a DeepSpeed MoE layer ({path}); expert parallelism is not supported by rigl_ds"
            )
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True) is False or hasattr(p, "group_name"):
            raise RigLConfigError(
                f"model: parameter {name!r} is an expert-parallel parameter (allreduce=False, group_name="
                f"{getattr(p, 'group_name', None)!r}); expert parallelism is not supported by rigl_ds"
            )


def _tensor_parallel_size(mpu: Any) -> int:
    """Ranks a weight is cut across by ``mpu``. A pipeline's grid counts its stages as "model
    parallel" too, so its tensor-slicing size is asked for first."""
    if mpu is None:
        return 1
    getters = ("get_tensor_model_parallel_world_size", "get_slice_parallel_world_size", "get_model_parallel_world_size")
    for getter in getters:
        if callable(getattr(mpu, getter, None)):
            return int(getattr(mpu, getter)())
    return 1


def _engine_config(engine: Any) -> Dict[str, Any]:
    """The config dict an already-built engine was made from (DeepSpeed parsed it into ``_config``)."""
    parsed = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if isinstance(parsed, dict):
        return parsed
    return _ds_config_dict(getattr(engine, "config", None), None) or {}
