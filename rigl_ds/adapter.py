"""What every entry point does the same way, so that each adapter only says *when* to do it.

The plain loop (``rigl_ds.pytorch.SparseTraining``), DeepSpeed (``SparseEngine``), and through it the
Hugging Face callback and accelerate, all plan the model with :func:`plan_for_model`, start their
controller with :func:`start_controller`, mark a deliberately skipped optimizer step with
:func:`mark_step_skipped` and tell mask updates with :class:`UpdateWatch`. FLOPs are accounted by
``rigl_ds.flops.FlopsMeter``. Pure torch, like the rest of the core.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .config import SINGLE_PROCESS_KEYS, RigLConfig, RigLConfigError
from .controller import SparseController
from .fan_in import output_axes, unit_plan
from .layers import find_sparse_weights, global_shape
from .pipeline import pipeline_grid, stage_plan
from .plan import SparsityPlan, build_plan
from .shards import Collectives, Shard


def plan_for_model(
    model: torch.nn.Module, config: RigLConfig, single_process: bool = False
) -> Tuple[Dict[str, torch.nn.Parameter], SparsityPlan]:
    """The weights this process masks and their plan, from global shapes (a ZeRO-3 partitioned
    parameter counts at its full shape); on a pipeline stage, its part of the whole model's plan (a
    collective over the pipe group: every stage calls it together). Raises ``RigLConfigError``
    naming the key when the block does not fit the model (a pattern that matches nothing, ...).
    ``single_process``: as for :func:`start_controller`."""
    if not single_process:
        refuse_single_process_keys(config)
    try:
        grid = pipeline_grid(model)
        if grid is not None:
            return stage_plan(model, config, grid)
        weights = find_sparse_weights(model, config.modules)
        plan = build_plan(config, {n: global_shape(p) for n, p in weights.items()})
        return weights, unit_plan(plan, output_axes(model))  # constant fan-in / N:M pools, when set
    except ValueError as exc:
        raise RigLConfigError(str(exc)) from None


def start_controller(
    config: RigLConfig,
    plan: SparsityPlan,
    shards: Sequence[Shard],
    comm: Collectives,
    total_steps: Optional[int] = None,
    *,
    defer_total_steps: bool = False,
    on_masks_changed: Optional[Callable[[], None]] = None,
    single_process: bool = False,
    masks_from_storage: bool = False,
) -> SparseController:
    """The controller over ``shards``, its masks initialised (exact counts at the method's starting
    sparsity, masked weights and state zeroed). ``on_masks_changed`` (compact optimizer state
    re-packing itself) runs at initialisation and after every later change of the masks.
    ``single_process``: the plain-PyTorch path (whole tensors); every other caller is the sharded
    path, which refuses the keys it does not implement yet (``refuse_single_process_keys``).
    ``masks_from_storage``: the shards' masks are the initial ones already (packed storage, whose
    positions were chosen by the same rule when the model was packed): counts are checked, nothing
    is selected again."""
    if not single_process:
        refuse_single_process_keys(config)
    controller = SparseController(config, plan, shards, comm, total_steps, defer_total_steps=defer_total_steps)
    if on_masks_changed is not None:
        controller.mask_listeners.append(on_masks_changed)
    if masks_from_storage:
        controller.adopt_masks()
    else:
        controller.initialize_masks()
    return controller


def refuse_single_process_keys(config: RigLConfig) -> None:
    """Raises ``RigLConfigError`` naming each ``SINGLE_PROCESS_KEYS`` key set away from its default:
    the sharded (DeepSpeed) path does not implement them exactly yet, and never degrades silently."""
    bad = [
        key
        for key in SINGLE_PROCESS_KEYS
        if getattr(config, key) != RigLConfig.model_fields[key].default
    ]
    if bad:
        raise RigLConfigError(
            "; ".join(
                f"rigl.{key}: {getattr(config, key)!r} is implemented on the single-process path "
                "(rigl_ds.sparsify) only, not yet on the sharded DeepSpeed path; leave it at its default "
                f"({RigLConfig.model_fields[key].default!r}) here"
                for key in bad
            )
        )


def mark_step_skipped(optimizer: torch.optim.Optimizer) -> None:
    """Call in place of ``optimizer.step()`` when an update step skips it on purpose: the LR
    schedule stays aligned with iterations, so keep torch's LR scheduler from warning that it
    stepped before the optimizer (``lr_scheduler.step() before optimizer.step()``), which it keys on
    this flag."""
    optimizer._opt_called = True


class UpdateWatch:
    """Whether the controller updated masks since the watch was made (or last asked): counts
    ``controller.updates``, so make it after a checkpoint load, which moves that counter."""

    def __init__(self, controller: SparseController):
        self.controller = controller
        self.seen = controller.updates

    def changed(self) -> bool:
        """True once per batch of updates: the next call compares with the count seen now."""
        now = self.controller.updates
        changed, self.seen = now != self.seen, now
        return changed
