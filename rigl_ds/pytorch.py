"""Plain-PyTorch entry point: any model, any torch optimizer, the same ``"rigl"`` config.

It is what users without DeepSpeed run, and the single-process reference the distributed paths
are checked against::

    sparse = rigl_ds.sparsify(model, optimizer, {"method": "rigl", "sparsity": 0.9}, total_steps=1000)
    for batch in loader:
        loss = model(batch).loss
        loss.backward()
        sparse.step()            # in place of optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .adapter import UpdateWatch, mark_step_skipped, plan_for_model, start_controller
from .compact import CompactOptimizer
from .config import ConfigLike, RigLConfig, RigLConfigError, load_config
from .exploration import ExplorationTracker
from .fan_in import output_axes
from .flops import FlopsMeter, FlopsReport, TrainingFlops, weight_uses
from .grown import GrownEntrySteps
from .masks import keep_active
from .packed import arm_dense_gradients, check_positions, dense_state_dict, pack_model
from .shards import LocalCollectives, WholeTensorShard


class SparseTraining:
    """Masks, schedule and updates for one model and its optimizer in a single process."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: ConfigLike = None,
        total_steps: Optional[int] = None,
    ):
        self.config: RigLConfig = load_config(config)
        self.model = model
        self.optimizer = optimizer
        weights, plan = plan_for_model(model, self.config, single_process=True)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        absent = [layer.name for layer in plan.layers if id(weights[layer.name]) not in in_optimizer]
        if absent:
            raise ValueError(f"masked weights are not in the optimizer's param_groups: {absent[:5]}")
        self.plan = plan
        self.packed = self.config.storage == "packed"
        if self.packed and isinstance(optimizer, CompactOptimizer):
            raise RigLConfigError(
                'rigl.storage: "packed" keeps optimizer state for active entries only by itself; '
                "pass a plain torch optimizer, not a CompactOptimizer"
            )
        self.shards = [WholeTensorShard(layer, weights[layer.name], optimizer) for layer in plan.layers]
        repack = self._repack_optimizer_state if isinstance(optimizer, CompactOptimizer) else None
        self.controller = start_controller(
            self.config,
            plan,
            self.shards,
            LocalCollectives(),
            total_steps,
            on_masks_changed=repack,
            single_process=True,
        )
        if self.packed:
            # Masks were chosen on the dense weights; from here on only the active values are kept.
            self.shards = self.controller.shards = pack_model(model, self.shards, weights, optimizer)
            del weights
        # RigL-plus: the optimizer steps of grown entries (a no-op unless the block asks for it).
        self.grown = GrownEntrySteps(self.config, self.shards, optimizer)
        if self.grown.active:
            self.grown.masks_changed()
            self.controller.mask_listeners.append(self.grown.masks_changed)
        self.exploration = ExplorationTracker(self.controller, output_axes(model))
        self._masked_at_step = [-1] * len(self.shards)  # step at which each hook last masked its gradient
        if self.packed:
            self._hooks = []  # nothing masked to zero in a gradient
            arm_dense_gradients(self.shards, self.controller)
        else:
            self._hooks = [
                shard.param.register_post_accumulate_grad_hook(self._make_grad_hook(i, shard))
                for i, shard in enumerate(self.shards)
            ]
        self._flops: Optional[FlopsMeter] = None  # set by measure_flops
        self._examples = 1
        self.training_flops = TrainingFlops()

    def _repack_optimizer_state(self) -> None:
        """Compact optimizer state: each masked weight's moments only at its active entries."""
        for shard in self.shards:
            self.optimizer.set_stateful(shard.param, shard.mask)

    def _make_grad_hook(self, index: int, shard: WholeTensorShard) -> Callable[[torch.Tensor], None]:
        def mask_accumulated_grad(param: torch.Tensor) -> None:
            if param.grad is not None and self.controller.gradients_may_be_masked_now:
                keep_active(param.grad.view(-1), shard.mask)
                self._masked_at_step[index] = self.controller.step

        return mask_accumulated_grad

    def remove(self) -> None:
        """Detaches the gradient hooks (the model keeps its zeros; masks are no longer enforced)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Replaces ``optimizer.step()``: masks gradients, steps (unless this update skips it), keeps
        masked weights at zero and updates masks on schedule."""
        step = self.controller.step
        updated = UpdateWatch(self.controller)
        masked = self.packed or all(m == step for m in self._masked_at_step)
        run = self.controller.before_step(grads_already_masked=masked)
        loss = None
        if run:
            if self.grown.active:
                self.grown.before_step()
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            if self.grown.active:
                self.grown.after_step()
        else:
            mark_step_skipped(self.optimizer)  # a deliberate skip (RigL update step)
        self.controller.after_step(run)
        if self.packed:
            arm_dense_gradients(self.shards, self.controller)
        if self._flops is not None:
            update_step = updated.changed()
            if update_step:
                self._flops.refresh(self.layer_report())
            self._flops.add_step(update_step, self._examples)
        return loss

    # -- what users read -----------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return self.controller.step

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """Boolean masks in the weights' shapes (unpacked copies: the live masks are bits)."""
        return {s.layer.name: s.mask.view(s.layer.shape) for s in self.shards}

    def layer_report(self) -> List[Dict[str, Any]]:
        return self.controller.layer_report()

    def drop_fraction(self) -> float:
        return self.controller.method.drop_fraction(self.controller.step)

    def measure_flops(self, *example_args: Any, examples: int = 1, **example_kwargs: Any) -> FlopsReport:
        """Records how often each weight is used per example (one forward on the given inputs, whose
        batch holds ``examples`` examples), then accounts FLOPs at every later step."""
        uses = weight_uses(self.model, *example_args, **example_kwargs)
        self._flops = FlopsMeter(
            self.model, uses, examples, self.config.method, self.config.delta_t, spent=self.training_flops
        )
        self._examples = examples
        return self._flops.refresh(self.layer_report())

    def flops(self) -> FlopsReport:
        """Per-example inference and training FLOPs at the current masks, against dense."""
        if self._flops is None:
            raise RuntimeError("call measure_flops(example_inputs) first")
        return self._flops.report_at(self.layer_report())

    def dense_state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's state dict with every masked weight dense under its own name, whatever the
        storage: what a plain model of the same class loads (``"packed"``: parametrizations resolved)."""
        return dense_state_dict(self.model) if self.packed else dict(self.model.state_dict())

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = self.controller.state_dict()
        if self.grown.active:
            state["grown"] = self.grown.state_dict()  # per-entry growth steps (grow_* options)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores masks and schedule; load the model and optimizer state dicts first."""
        self.controller.load_state_dict(state)
        if self.grown.active:
            if "grown" in state:
                self.grown.load_state_dict(state["grown"])
            else:  # an older checkpoint: restored entries carry their saved Adam state, none counts as grown
                self.grown.forget()
        if self.packed:
            check_positions(self.shards)
            arm_dense_gradients(self.shards, self.controller)


def sparsify(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: ConfigLike = None, total_steps: Optional[int] = None
) -> SparseTraining:
    """Makes ``model`` sparse under ``config`` (a ``"rigl"`` block, a DeepSpeed config holding one,
    or a JSON path): masks are initialised now, and ``.step()`` replaces ``optimizer.step()``.
    ``total_steps`` (optimizer steps) is needed when the block sets ``end_fraction`` but not ``end_step``."""
    return SparseTraining(model, optimizer, config, total_steps)
