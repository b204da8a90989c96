"""Gradual magnitude pruning (Zhu & Gupta 2017): dense-to-sparse, every delta_t steps prune by
magnitude to s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))**3, distributed over layers as configured."""

from typing import Sequence

from .. import schedules
from ..config import RigLConfig
from ..masks import UpdateStats, prune_to
from ..shards import Collectives, Shard
from .base import SparseMethod
from .registry import register


@register("gmp")
class GMPMethod(SparseMethod):
    own_keys = ("initial_sparsity",)
    keeps_counts = False  # pruning shrinks every count

    @classmethod
    def check_config(cls, config: RigLConfig) -> None:
        if config.initial_sparsity > config.sparsity:
            raise ValueError(
                f"initial_sparsity ({config.initial_sparsity}) must not exceed sparsity ({config.sparsity}) "
                f"for method {cls.name}"
            )

    @property
    def initial_sparsity(self) -> float:
        return self.config.initial_sparsity

    def sparsity_at(self, step: int) -> float:
        c = self.config
        return schedules.gmp_sparsity(step, c.sparsity, c.initial_sparsity, c.begin_step, self.end_step)

    def update(self, shards: Sequence[Shard], comm: Collectives, step: int) -> UpdateStats:
        return prune_to(shards, comm, self.plan.n_pools, step, self.plan.targets(self.sparsity_at(step)))
