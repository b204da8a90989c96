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
    ):
        self.config = config
        self.plan = plan
        self.shards = list(shards)
        self.comm = comm
        self.end_step = config.resolve_end_step(total_steps)
        self.method = METHODS[config.method](config, plan, self.end_step)
        self.step = 0
        self.last_update = config.begin_step - config.delta_t  # reference: first update at begin_step
        self.skipped_updates = 0
        self.updates = 0  # mask updates since step 0, across resumes (``history`` is this process's only)
        self.history: List[UpdateStats] = []
        self._update_after_step = False
        self._is_update_step = False
        # Called with no arguments whenever the masks change (initialisation, an update, a checkpoint
        # load), before the next optimizer step: compact optimizer state re-packs itself there.
        self.mask_listeners: List[Callable[[], None]] = []

    # -- masks -------------------------------------------------------------------------------
    def initialize_masks(self) -> None:
        """Exact per-pool counts at the method's starting sparsity; masked weights and state zeroed."""
        sparsity = self.method.initial_sparsity
        sizes = self.plan.pool_sizes()
        targets = self.plan.targets(sparsity) if sparsity > 0 else sizes
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
        t = self.step
        method = self.method
        self._update_after_step = False
        update = method.is_update_step(t, self.last_update)
        finite = True
        if update or method.tracks_gradients:
            finite = gradients_finite(self.shards, self.comm)
        if finite and method.tracks_gradients:
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

    def after_step(self, stepped: bool) -> None:
        """Runs after the optimizer step (or in its place when it was skipped)."""
        if stepped:
            apply_masks(self.shards)
        if self._update_after_step:
            self._update(self.step)
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

    def _update(self, t: int) -> None:
        comm_before, start = self.comm.stats.copy(), time.perf_counter()
        stats = self.method.update(self.shards, self.comm, t)
        spent = self.comm.stats - comm_before
        stats.seconds = time.perf_counter() - start
        stats.collectives, stats.bytes_sent, stats.comm_seconds = spent.collectives, spent.bytes_sent, spent.seconds
        self.last_update = t
        self.updates += 1
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
    def layer_report(self) -> List[Dict[str, Any]]:
        """Per masked layer: entries, active entries and sparsity, reduced over all ranks."""
        local = (
            torch.stack([s.active_count() for s in self.shards]) if self.shards else torch.zeros(0, dtype=torch.long)
        )
        active = self.comm.all_reduce_sum(local).cpu().tolist()
        return [
            {"name": s.layer.name, "numel": s.layer.numel, "active": a, "sparsity": 1.0 - a / s.layer.numel}
            for s, a in zip(self.shards, active)
        ]

    def state_dict(self) -> Dict[str, Any]:
        """This process's masks (its shards) and the method's state: enough to resume bit-identically."""
        return {
            "step": self.step,
            "last_update": self.last_update,
            "skipped_updates": self.skipped_updates,
            "updates": self.updates,
            "config": self.config.model_dump(),
            "masks": {s.layer.name: s.mask for s in self.shards},  # bool on disk: readable without rigl_ds
            "pool_counts": self.active_counts(),
            "method_state": self.method.state_dict(self.shards),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        masks = state["masks"]
        missing = [s.layer.name for s in self.shards if s.layer.name not in masks]
        if missing:
            raise ValueError(f"checkpoint has no masks for {missing[:5]}")
        for s in self.shards:
            m = masks[s.layer.name]
            if m.numel() != s.numel:
                raise ValueError(f"{s.layer.name}: checkpoint mask has {m.numel()} entries, this shard {s.numel}")
            s.mask = m.reshape(-1)
        check_counts(
            self.shards, self.comm, self.plan.n_pools, torch.as_tensor(state["pool_counts"]), "checkpoint load"
        )
        self.step = int(state["step"])
        self.last_update = int(state["last_update"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.updates = int(state.get("updates", 0))
        self.method.load_state_dict(state.get("method_state", {}), self.shards)
        apply_masks(self.shards, with_optimizer_state=True)
        self._masks_changed()
