"""RigL (Evci et al. 2020): grow where the dense gradient of this batch is largest in magnitude.

The gradient is the data-parallel reduced one (|sum|, never a mean of per-rank |g|); the update
runs before the optimizer step, which the reference then skips (``skip_optimizer_step_on_update``).
"""

from typing import Callable, List, Sequence

import torch

from .. import keyed_random
from ..shards import Shard
from .base import DropGrowMethod, dense_gradients
from .registry import register


@register("rigl")
class RigLMethod(DropGrowMethod):
    update_before_step = True
    uses_gradients = True
    selects_in_backward = True
    skip_optimizer_step_on_update = True  # as the reference does on update steps

    @classmethod
    def expected_training_flops(cls, f_sparse: float, f_dense: float, delta_t: int) -> float:
        # The paper's formula as written (the base class's average, summed in the paper's order).
        return (3.0 * f_sparse * delta_t + 2.0 * f_sparse + f_dense) / (delta_t + 1)

    own_keys = ("grow_candidate_fraction",)

    def grow_scores(self, shards: Sequence[Shard], step: int) -> List[Callable[[], torch.Tensor]]:
        grads = dense_gradients(shards, self.name, step)
        fraction = self.config.grow_candidate_fraction
        if fraction >= 1.0:
            return [lambda g=g: g.abs() for g in grads]
        # RigL-plus: grow by |g| within a random candidate pool (a keyed draw per entry, the same on
        # every process); entries outside it rank below every candidate, in random order.
        seed = self.config.seed

        def pooled(s: Shard, g: torch.Tensor) -> torch.Tensor:
            key = keyed_random.derive_key(seed, "grow_pool", s.layer.name, step)
            u = keyed_random.uniform_range(key, s.offset, s.numel, s.device).to(g.device)
            return torch.where(u < fraction, g.abs().float(), -1.0 - u)

        return [lambda s=s, g=g: pooled(s, g) for s, g in zip(shards, grads)]
