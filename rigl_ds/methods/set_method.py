"""SET (Mocanu et al. 2018): grow uniformly at random, keyed by (seed, layer, step, global index)
so every rank and every world size draws the same scores."""

from typing import Callable, List, Sequence

import torch

from .. import keyed_random
from ..shards import Shard
from .base import DropGrowMethod
from .registry import register


@register("set")
class SETMethod(DropGrowMethod):
    def grow_scores(self, shards: Sequence[Shard], step: int) -> List[Callable[[], torch.Tensor]]:
        seed = self.config.seed
        return [
            lambda s=s: keyed_random.uniform_range(
                keyed_random.derive_key(seed, "set", s.layer.name, step), s.offset, s.numel, s.device
            )
            for s in shards
        ]
