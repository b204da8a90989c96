"""RigL (Evci et al. 2020): grow where the dense gradient of this batch is largest in magnitude.

The gradient is the data-parallel reduced one (|sum|, never a mean of per-rank |g|); the update
runs before the optimizer step, which the reference then skips (``skip_optimizer_step_on_update``).
"""

from typing import List, Sequence

import torch

from ..shards import Shard
from .base import DropGrowMethod, dense_gradients


class RigLMethod(DropGrowMethod):
    name = "rigl"
    update_before_step = True
    uses_gradients = True

    def grow_scores(self, shards: Sequence[Shard], step: int) -> List[torch.Tensor]:
        return [g.abs() for g in dense_gradients(shards, self.name, step)]
