"""What every method shares: the update schedule, state hooks and the generic drop/grow update."""

from __future__ import annotations

from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import keyed_random, schedules
from ..config import RigLConfig
from ..masks import UpdateStats, drop_and_grow, select_drop_grow
from ..plan import SparsityPlan
from ..shards import Collectives, Shard


class SparseMethod:
    """A sparse-training method: when masks change and how. Subclasses say only what differs.

    The class also carries what config validation and FLOPs accounting need to know about the
    method, so a new method is one file registered with ``@rigl_ds.methods.register("name")``.
    """

    #: The ``"rigl".method`` string, set by ``register``.
    name: ClassVar[str] = ""
    #: Masks ever change after initialisation.
    updates_masks: ClassVar[bool] = True
    #: The update scores growth with this step's gradients, so it runs before the optimizer step.
    update_before_step: ClassVar[bool] = False
    #: Reads dense gradients at updates (non-finite gradients then skip the update).
    uses_gradients: ClassVar[bool] = False
    #: Reads the dense gradients on every step (SNFS's moving average), not only at updates.
    tracks_gradients: ClassVar[bool] = False
    #: What ``skip_optimizer_step_on_update: null`` (the default) means for this method.
    skip_optimizer_step_on_update: ClassVar[bool] = False
    #: Every layer keeps its active count through updates (``"storage": "packed"`` holds that many
    #: slots per layer); False for a method whose counts shrink (GMP).
    keeps_counts: ClassVar[bool] = True
    #: The update reads each layer's own weights and gradient only, and runs before the optimizer
    #: step: packed storage may then select each layer inside backward, as soon as its gradient is
    #: reduced, and drop that gradient (``select_layer``), instead of keeping every layer's until the
    #: update.
    selects_in_backward: ClassVar[bool] = False
    #: Keys of the ``"rigl"`` block only this method reads; setting one with another method is an error.
    own_keys: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def check_config(cls, config: RigLConfig) -> None:
        """Raises ValueError for settings this method cannot train with; runs once, at start-up."""

    @classmethod
    def training_flops_per_step(cls, f_sparse: float, f_dense: float, update_step: bool) -> float:
        """One step's FLOPs per example: forward, backward to inputs and backward to weights (3 forwards'
        worth), the backward to weights dense on every step whose dense gradient the method reads."""
        if cls.tracks_gradients or (cls.uses_gradients and update_step):
            return 2.0 * f_sparse + f_dense
        return 3.0 * f_sparse

    @classmethod
    def expected_training_flops(cls, f_sparse: float, f_dense: float, delta_t: int) -> float:
        """Per-example FLOPs averaged over one update period: ``delta_t`` ordinary steps and one update."""
        steady = cls.training_flops_per_step(f_sparse, f_dense, False)
        update = cls.training_flops_per_step(f_sparse, f_dense, True)
        if update == steady:
            return steady
        return (steady * delta_t + update) / (delta_t + 1)

    def __init__(self, config: RigLConfig, plan: SparsityPlan, end_step: Optional[int]):
        self.config = config
        self.plan = plan
        self.end_step = end_step

    @property
    def initial_sparsity(self) -> float:
        return self.config.sparsity

    def is_update_step(self, step: int, last_update: int) -> bool:
        if not self.updates_masks:
            return False
        return schedules.is_update_step(step, last_update, self.config.begin_step, self.end_step, self.config.delta_t)

    def needs_dense_gradients(self, step: int, last_update: int) -> bool:
        """Whether this step's gradients of masked entries are read (else they may be zeroed as
        soon as backward produces them, so clipping and logging see the sparse model's gradients)."""
        return self.tracks_gradients or (self.uses_gradients and self.is_update_step(step, last_update))

    #: What the gradients ``observe_gradients`` sees are scaled by (DeepSpeed's fp16 loss scale; set
    #: by the controller before each call): divide by it to observe the true gradient.
    gradient_scale: float = 1.0

    def observe_gradients(self, shards: Sequence[Shard], step: int) -> None:
        """Called every step with the dense gradients, before masked entries are zeroed."""

    def update(self, shards: Sequence[Shard], comm: Collectives, step: int) -> UpdateStats:
        raise NotImplementedError

    def drop_fraction(self, step: int) -> float:
        return 0.0

    def state_dict(self, shards: Sequence[Shard]) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor], shards: Sequence[Shard]) -> None:
        pass


class DropGrowMethod(SparseMethod):
    """Drop the smallest-magnitude active weights, grow the entries of largest ``grow_scores``."""

    def drop_fraction(self, step: int) -> float:
        c = self.config
        return schedules.drop_fraction(step, c.alpha, c.begin_step, self.end_step, c.drop_fraction_schedule)

    def grow_scores(self, shards: Sequence[Shard], step: int) -> List[Union[torch.Tensor, Callable[[], torch.Tensor]]]:
        """Each shard's grow score: a tensor, or a zero-argument callable that builds a new one when
        the selection reads it (once per pass), so that only one layer's scores exist at a time."""
        raise NotImplementedError

    def select_layer(self, shard: Shard, comm: Collectives, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One layer's (keep, grow) bits of the update at ``step``, chosen as ``update`` would choose
        them among all layers (for ``selects_in_backward``; collectives run over ``comm``)."""
        _, keep, grow = select_drop_grow(
            [shard], comm, self.plan.n_pools, self.drop_fraction(step), self.grow_scores([shard], step)
        )
        return keep[0], grow[0]

    def update(self, shards: Sequence[Shard], comm: Collectives, step: int) -> UpdateStats:
        seed = self.config.seed
        selected = [s.take_selection() for s in shards]
        if any(x is None for x in selected):
            if any(x is not None for x in selected):
                missing = [s.layer.name for s, x in zip(shards, selected) if x is None]
                raise RuntimeError(f"update at step {step}: {missing[:5]} were not selected in backward, others were")
            selected = None
        return drop_and_grow(
            shards,
            comm,
            self.plan.n_pools,
            step,
            self.drop_fraction(step),
            None if selected else self.grow_scores(shards, step),
            self.config.grow_init,
            grow_key=lambda s: keyed_random.derive_key(seed, "grow_init", s.layer.name, step),
            selected=selected,
        )


def dense_gradients(shards: Sequence[Shard], method: str, step: int) -> List[torch.Tensor]:
    grads = []
    for s in shards:
        g = s.grad()
        if g is None:
            raise RuntimeError(
                f"{method} update at step {step}: {s.layer.name} has no gradient; "
                "call backward() before the optimizer step"
            )
        grads.append(g)
    return grads
