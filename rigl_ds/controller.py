"""Drives one method over a set of shards around each optimizer step.

Adapters (plain PyTorch, DeepSpeed) call ``before_step`` after backward and ``after_step`` after
the optimizer step; the controller decides whether the optimizer may step and keeps masked
entries at zero. It holds no tensors but the masks (inside the shards) and the method's state.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .checkpoint import saved_mask_bits
from .config import RigLConfig
from .masks import UpdateStats, apply_masks, check_counts, gradients_finite, init_masks, mask_gradients, pool_counts
from .methods import METHODS
from .plan import SparsityPlan
from .shards import Collectives, Shard

logger = logging.getLogger("rigl_ds")


class SparseController:
    def __init__(
        self,
        config: RigLConfig,
        plan: SparsityPlan,
        shards: Sequence[Shard],
        comm: Collectives,
        total_steps: Optional[int] = None,
        defer_total_steps: bool = False,
    ):
        """``defer_total_steps``: when ``end_fraction`` needs ``total_steps`` and none is known yet,
        wait for :meth:`set_total_steps` (an adapter that learns the count after the engine is built)
        instead of failing here; the first optimizer step then fails if it never came."""
        self.config = config
        self.plan = plan
        self.shards = list(shards)
        self.comm = comm
        self.end_step_pending = defer_total_steps and total_steps is None and _needs_total_steps(config)
        self.end_step = None if self.end_step_pending else config.resolve_end_step(total_steps)
        self.method = METHODS[config.method](config, plan, self.end_step)
        self.step = 0
        self.last_update = config.begin_step - config.delta_t  # reference: first update at begin_step
        self.skipped_updates = 0
        self.updates = 0  # mask updates since step 0, across resumes (``history`` is this process's only)
        self.n_active = int(plan.pool_sizes().sum())  # over all masked layers and ranks, across resumes
        self.last_drop_fraction = 0.0
        self.history: List[UpdateStats] = []
        self._update_after_step = False
        self._is_update_step = False
        # What the adapter's framework counts as a step to skip for non-finite gradients, and the
        # factor the gradients are scaled by (a loss scale). The defaults fit a loop with no loss
        # scaler; the DeepSpeed adapter puts DeepSpeed's own overflow check and loss scale here.
        self.overflow_check: Callable[[], bool] = lambda: not gradients_finite(self.shards, self.comm)
        self.gradient_scale: Callable[[], float] = lambda: 1.0
        # Called with no arguments whenever the masks change (initialisation, an update, a checkpoint
        # load), before the next optimizer step: compact optimizer state re-packs itself there.
        self.mask_listeners: List[Callable[[], None]] = []
        # Called with ("start", step) just before a mask update begins and ("end", step) once it is
        # over, with the step the update ran at: "end" comes after the masks changed (and the
        # ``mask_listeners`` ran) and after the adapter's own part of the update (``after_step``'s
        # ``after_update``), and also when the update raised. Not called on steps without an update.
        self.update_listeners: List[Callable[[str, int], None]] = []

    def set_total_steps(self, total_steps: int) -> None:
        """Sets the step count ``end_fraction`` is taken of, after construction (``defer_total_steps``,
        or an adapter that learns a better count than the one found at start-up). Allowed until the
        first optimizer step; after it, only a count that keeps the same end step."""
        end = self.config.resolve_end_step(total_steps)
        if not self.end_step_pending:
            if end == self.end_step:
                return
            if self.step > 0:
                raise RuntimeError(
                    f"rigl_ds: {self.step} steps in, updates end at step {self.end_step}; "
                    f"total_steps={total_steps} would move the end to step {end}"
                )
            logger.info(
                "rigl_ds: total_steps=%d moves the last update from step %s to %s", total_steps, self.end_step, end
            )
        self.end_step = self.method.end_step = end
        self.end_step_pending = False

    # -- masks -------------------------------------------------------------------------------
    def initialize_masks(self) -> None:
        """Exact per-pool counts at the method's starting sparsity; masked weights and state zeroed."""
        sparsity = self.method.initial_sparsity
        sizes = self.plan.pool_sizes()
        targets = self.plan.initial_targets(sparsity)
        self.n_active = int(targets.sum())
        init_masks(
            self.shards,
            self.comm,
            self.plan.n_pools,
            targets,
            self.config.seed,
            by_magnitude=self.config.distribution == "global",
            all_active=torch.equal(targets, sizes),
        )
        self._masks_changed()

    def adopt_masks(self) -> None:
        """The shards hold the initial masks already (packed storage chose them when it packed the
        model, by ``initialize_masks``' rule): check their exact per-pool counts and take them."""
        sparsity = self.method.initial_sparsity
        targets = self.plan.initial_targets(sparsity)
        check_counts(self.shards, self.comm, self.plan.n_pools, targets, "packed storage's initial masks")
        self.n_active = int(targets.sum())
        self._masks_changed()

    def _masks_changed(self) -> None:
        for listener in self.mask_listeners:
            listener()

    def active_counts(self) -> torch.Tensor:
        return pool_counts(self.shards, self.comm, self.plan.n_pools).cpu()

    # -- the step ----------------------------------------------------------------------------
    def before_step(self, grads_already_masked: bool = False) -> bool:
        """Runs after backward, before the optimizer step. Returns whether the optimizer should step.

        ``grads_already_masked``: the adapter zeroed masked gradients during backward under the
        current masks, so the pre-step pass is redundant unless an update changes the masks first.
        """
        if self.end_step_pending:
            from .config import RigLConfigError

            raise RigLConfigError(
                "rigl.end_step: not set, and rigl.end_fraction needs the number of training steps, which rigl_ds "
                'could not find (no DeepSpeed "scheduler" block with total_num_steps, no Trainer max_steps, no '
                'total_steps= from the script); set rigl.end_step in the "rigl" block'
            )
        t = self.step
        method = self.method
        self._update_after_step = False
        update = method.is_update_step(t, self.last_update)
        finite = True
        if update or method.tracks_gradients:
            finite = not self.overflow_check()
        if finite and method.tracks_gradients:
            method.gradient_scale = float(self.gradient_scale())  # observed gradients are unscaled by it
            method.observe_gradients(self.shards, t)
        self._is_update_step = update and finite
        if update and not finite:
            # Change nothing (no mask update, no optimizer step), as a loss scaler would; the
            # update rule retries on the next step.
            self.skipped_updates += 1
            logger.warning("rigl_ds: non-finite gradients at update step %d; update and optimizer step skipped", t)
            return False
        run_step = True
        if update:
            skip = self.config.skip_step_on_update
            if skip or method.update_before_step:
                self._update(t)
                run_step = not skip
            else:
                self._update_after_step = True
        if run_step and (update or not grads_already_masked):
            mask_gradients(self.shards)
        return run_step

    def after_step(
        self,
        stepped: bool,
        applied: bool = True,
        mask_weights: bool = True,
        after_update: Optional[Callable[[], None]] = None,
    ) -> None:
        """Runs after the optimizer step (or in its place when it was skipped). ``applied``: whether
        the framework counts the step as taken (DeepSpeed's ``was_step_applied()``: False when its
        loss scaler skipped the step for an overflow). The schedule, like the LR schedule, advances
        only on applied steps, and an update due after such a step waits for the next one.
        ``mask_weights=False``: the adapter has re-masked what the optimizer stepped itself.
        ``after_update``: what the adapter must do when masks change here, after the optimizer step
        (DeepSpeed: copy the re-masked fp32 weights into the low-precision ones); run as part of the
        update, before its "end" event, and only when an update ran."""
        if stepped and mask_weights:
            apply_masks(self.shards)
        if not applied:
            if self._update_after_step:
                self.skipped_updates += 1
                logger.warning("rigl_ds: the framework skipped step %d (overflow); its mask update waits", self.step)
            self._update_after_step = False
            return
        if self._update_after_step:
            self._update(self.step, after_update)
            self._update_after_step = False
        self.step += 1

    @property
    def gradients_may_be_masked_now(self) -> bool:
        """True when the coming optimizer step reads no gradient of a masked entry, so adapters may
        zero those gradients during backward (the reference's gradients are zero there: its layers
        compute with mask * w). Between updates that makes clipping see only active entries."""
        return not self.method.needs_dense_gradients(self.step, self.last_update)

    @property
    def was_update_step(self) -> bool:
        """Whether the step that just ran changed masks (for FLOPs accounting and logs)."""
        return self._is_update_step

    def _update(self, t: int, after_update: Optional[Callable[[], None]] = None) -> None:
        for listener in self.update_listeners:
            listener("start", t)
        try:
            self._run_update(t)
            if after_update is not None:
                after_update()
        finally:
            for listener in self.update_listeners:
                listener("end", t)

    def _run_update(self, t: int) -> None:
        comm_before, start = self.comm.stats.copy(), time.perf_counter()
        stats = self.method.update(self.shards, self.comm, t)
        spent = self.comm.stats - comm_before
        stats.seconds = time.perf_counter() - start
        stats.collectives, stats.bytes_sent, stats.comm_seconds = spent.collectives, spent.bytes_sent, spent.seconds
        self.last_update = t
        self.updates += 1
        self.n_active, self.last_drop_fraction = int(stats.n_active), float(stats.drop_fraction)
        self.history.append(stats)
        self._masks_changed()
        logger.info(
            "rigl_ds: step %d %s update: drop fraction %.4f, dropped %d, grown %d (regrown %d), active %d; "
            "%.3f s, %d collectives, %d bytes sent (%.3f s in collectives)",
            t,
            self.config.method,
            stats.drop_fraction,
            stats.dropped,
            stats.grown,
            stats.regrown,
            stats.n_active,
            stats.seconds,
            stats.collectives,
            stats.bytes_sent,
            stats.comm_seconds,
        )

    # -- reporting and checkpoints ----------------------------------------------------------
    def metrics(self) -> Dict[str, float]:
        """The ``rigl/*`` figures every adapter logs, from counters a checkpoint restores (no
        collective: ranks may log independently)."""
        total = int(self.plan.pool_sizes().sum())
        return {
            "rigl/drop_fraction": self.last_drop_fraction,
            "rigl/n_active": self.n_active,
            "rigl/sparsity": 1.0 - self.n_active / total if total else 0.0,
            "rigl/updates": self.updates,
        }

    def layer_report(self) -> List[Dict[str, Any]]:
        """Per masked layer: entries, active entries and sparsity, reduced over all ranks."""
        local = (
            torch.stack([s.active_count().to(self.shards[0].device) for s in self.shards])
            if self.shards
            else torch.zeros(0, dtype=torch.long)
        )
        active = self.comm.all_reduce_sum(local).cpu().tolist()
        return [
            {"name": s.layer.name, "numel": s.layer.numel, "active": a, "sparsity": 1.0 - a / s.layer.numel}
            for s, a in zip(self.shards, active)
        ]

    def state_dict(self) -> Dict[str, Any]:
        """This process's masks (its shards) and the method's state: enough to resume bit-identically.

        Each mask as its packed bits (a copy of ``shard.mask_bits``: uint8, ``ceil(numel / 8)`` bytes,
        ``rigl_ds.bits`` order), with its entries in ``"mask_numel"``: no layer's mask is unpacked to
        bool here. ``load_state_dict`` (and ``rigl_ds.checkpoint``) also take the bool masks that
        states held before (``"masks"`` of bool tensors, no ``"mask_numel"``)."""
        return {
            "step": self.step,
            "last_update": self.last_update,
            "skipped_updates": self.skipped_updates,
            "updates": self.updates,
            "last_drop_fraction": self.last_drop_fraction,
            "config": self.config.model_dump(),
            "masks": {s.layer.name: s.mask_bits.clone() for s in self.shards},
            "mask_numel": {s.layer.name: s.numel for s in self.shards},
            "pool_counts": self.active_counts(),
            "method_state": self.method.state_dict(self.shards),
        }

    def check_resume_config(self, saved: Dict[str, Any]) -> None:
        """Refuses a resume whose ``"rigl"`` block changes what the saved masks mean (sparsity,
        distribution, modules, mask groups, method, ...), naming each key; logs allowed changes."""
        from .config import RigLConfigError, resume_changes

        refused, allowed = resume_changes(saved, self.config)
        if refused:
            listed = "; ".join(f"rigl.{k}: saved {a!r}, now {b!r}" for k, (a, b) in refused.items())
            raise RigLConfigError(
                f"the checkpoint's masks were made under another \"rigl\" block ({listed}); resume with the "
                "saved values, or start a new run"
            )
        for key, (a, b) in allowed.items():
            logger.warning("rigl_ds: resuming with rigl.%s changed from %r to %r", key, a, b)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_resume_config(state.get("config", {}))
        masks = state["masks"]
        missing = [s.layer.name for s in self.shards if s.layer.name not in masks]
        if missing:
            raise ValueError(f"checkpoint has no masks for {missing[:5]}")
        for s in self.shards:  # one layer at a time: a bool mask (older states) is packed here
            packed, numel = saved_mask_bits(state, s.layer.name)
            if numel != s.numel:
                raise ValueError(f"{s.layer.name}: checkpoint mask has {numel} entries, this shard {s.numel}")
            s.mask_bits = packed.to(s.device)
        check_counts(
            self.shards, self.comm, self.plan.n_pools, torch.as_tensor(state["pool_counts"]), "checkpoint load"
        )
        self.step = int(state["step"])
        self.last_update = int(state["last_update"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.updates = int(state.get("updates", 0))
        self.n_active = int(torch.as_tensor(state["pool_counts"]).sum())
        self.last_drop_fraction = float(state.get("last_drop_fraction", 0.0))
        self.method.load_state_dict(state.get("method_state", {}), self.shards)
        apply_masks(self.shards, with_optimizer_state=True)
        self._masks_changed()


def _needs_total_steps(config: RigLConfig) -> bool:
    try:
        config.resolve_end_step(None)
    except ValueError:
        return True
    return False
