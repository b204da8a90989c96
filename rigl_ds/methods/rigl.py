"""RigL (Evci et al. 2020): grow where the dense gradient of this batch is largest in magnitude.

The gradient is the data-parallel reduced one (|sum|, never a mean of per-rank |g|); the update
runs before the optimizer step, which the reference then skips (``skip_optimizer_step_on_update``).
"""

from typing import List, Sequence

import torch

from ..shards import Shard
from .base import DropGrowMethod, dense_gradients
from .registry import register


@register("rigl")
class RigLMethod(DropGrowMethod):
    update_before_step = True
    uses_gradients = True
    skip_optimizer_step_on_update = True  # as the reference does on update steps

    @classmethod
    def expected_training_flops(cls, f_sparse: float, f_dense: float, delta_t: int) -> float:
        # The paper's formula as written (the base class's average, summed in the paper's order).
        return (3.0 * f_sparse * delta_t + 2.0 * f_sparse + f_dense) / (delta_t + 1)

    def grow_scores(self, shards: Sequence[Shard], step: int) -> List[torch.Tensor]:
        return [g.abs() for g in dense_gradients(shards, self.name, step)]
