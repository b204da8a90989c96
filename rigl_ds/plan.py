"""The sparsity plan: which weights are masked, their mask groups, pools and target counts.

A *mask group* (unit) is the paper's "layer": a whole weight by default, or one of ``blocks``
equal slices along ``axis`` (fused Q/K/V, RNN gates). A *pool* is the set of units that share
one top-k: a single unit under uniform/ER/ERK, every free unit under ``global``. Everything here
is a pure function of the config and the weights' global shapes, so all processes agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from .config import RigLConfig
from .distributions import free_budget, layer_sparsities, zeros_for
from .layers import resolve_patterns


@dataclass(frozen=True)
class LayerPlan:
    """One masked weight: its global shape, how it splits into units and which pool each unit is in."""

    name: str
    shape: Tuple[int, ...]
    axis: int = 0
    blocks: int = 1
    pools: Tuple[int, ...] = (0,)
    index: int = 0  # position among masked layers (tie-break order, stable key)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def unit_names(self) -> List[str]:
        if self.blocks == 1:
            return [self.name]
        return [f"{self.name}[{b}/{self.blocks}]" for b in range(self.blocks)]

    @property
    def unit_shape(self) -> Tuple[int, ...]:
        shape = list(self.shape)
        shape[self.axis] //= self.blocks
        return tuple(shape)

    def block_of(self, index: torch.Tensor) -> torch.Tensor:
        """Mask group of each global flat index: a function of the index alone, so any shard can compute it."""
        if self.blocks == 1:
            return torch.zeros_like(index)
        inner = math.prod(self.shape[self.axis + 1 :])
        coord = (index // inner) % self.shape[self.axis]
        return coord // (self.shape[self.axis] // self.blocks)

    def pool_ids(self, index: torch.Tensor) -> torch.Tensor:
        if len(set(self.pools)) == 1:
            return torch.full_like(index, self.pools[0])
        table = torch.tensor(self.pools, dtype=torch.long, device=index.device)
        return table[self.block_of(index)]


@dataclass
class SparsityPlan:
    config: RigLConfig
    layers: List[LayerPlan]
    n_pools: int
    unit_shapes: Dict[str, Tuple[int, ...]]
    dense_units: List[str]  # kept dense: no mask, but they count in the budget
    custom_units: Dict[str, float]

    def unit_sparsities(self, sparsity: float) -> Dict[str, float]:
        """Per-unit sparsity at an overall ``sparsity``, dense units included (at 0). Not for the
        global distribution, whose split across layers follows the weights (see ``targets``)."""
        return layer_sparsities(
            self.unit_shapes,
            sparsity,
            self.config.distribution,
            dense=self.dense_units,
            custom=self.custom_units,
            erk_power_scale=self.config.erk_power_scale,
        )

    def targets(self, sparsity: float) -> torch.Tensor:
        """Active entries each pool must hold at an overall ``sparsity`` (exact integers)."""
        out = torch.zeros(self.n_pools, dtype=torch.long)
        if self.config.distribution == "global":
            out[0] = free_budget(self.unit_shapes, sparsity, self.dense_units, self.custom_units)
            if out[0] <= 0 and any(0 in layer.pools for layer in self.layers):
                raise ValueError(f"sparsity {sparsity} cannot be met: the dense layers use the whole parameter budget")
            for layer in self.layers:
                for unit, pool in zip(layer.unit_names, layer.pools):
                    if unit in self.custom_units:
                        n = math.prod(self.unit_shapes[unit])
                        out[pool] = n - zeros_for(self.custom_units[unit], n)
            return out
        sparsities = self.unit_sparsities(sparsity)
        for layer in self.layers:
            for unit, pool in zip(layer.unit_names, layer.pools):
                n = math.prod(self.unit_shapes[unit])
                out[pool] = n - zeros_for(sparsities[unit], n)
        return out

    def initial_targets(self, sparsity: float) -> torch.Tensor:
        """``targets`` at a starting sparsity, where 0 (GMP's start) means every entry active."""
        return self.targets(sparsity) if sparsity > 0 else self.pool_sizes()

    def subset(self, names: Sequence[str]) -> "SparsityPlan":
        """The plan of only the layers ``names`` (one pipeline stage's), each keeping the target it
        has in this whole plan: the budget stays split over every unit here, dense ones included.
        Layers keep their ``index`` (the stable key of their random streams); pools are renumbered.
        A pool shared with a layer left out (``global``) would need a top-k across the parts: refused."""
        keep = set(names)
        layers = [layer for layer in self.layers if layer.name in keep]
        pools = sorted({p for layer in layers for p in layer.pools})
        left_out = {p for layer in self.layers if layer.name not in keep for p in layer.pools}
        if left_out & set(pools):
            raise ValueError(
                f"rigl.distribution: {self.config.distribution!r} shares one top-k between layers that "
                "live on different pipeline stages; use 'erk', 'er' or 'uniform' with pipeline parallelism"
            )
        renumber = {p: i for i, p in enumerate(pools)}
        layers = [replace(layer, pools=tuple(renumber[p] for p in layer.pools)) for layer in layers]
        whole = self.targets(self.config.sparsity)
        plan = SparsityPlan(self.config, layers, len(pools), self.unit_shapes, self.dense_units, self.custom_units)
        if not torch.equal(plan.targets(self.config.sparsity), whole[pools]):
            raise RuntimeError("rigl_ds: a plan's subset changed its layers' targets")  # per-unit pools only
        return plan

    def pool_sizes(self) -> torch.Tensor:
        out = torch.zeros(self.n_pools, dtype=torch.long)
        for layer in self.layers:
            per_unit = layer.numel // layer.blocks
            for pool in layer.pools:
                out[pool] += per_unit
        return out


def build_plan(config: RigLConfig, shapes: Mapping[str, Sequence[int]]) -> SparsityPlan:
    """Resolves dense_layers, custom_sparsity and mask_groups patterns against the sparsifiable
    weights (in order) and assigns pools. Every pattern must match; errors name the key."""
    names = list(shapes)
    dense_weights = sorted(
        {n for hits in resolve_patterns(config.dense_layers, names, "dense_layers").values() for n in hits}
    )
    custom_weights: Dict[str, float] = {}
    for pattern, hits in resolve_patterns(config.custom_sparsity, names, "custom_sparsity").items():
        for n in hits:
            value = config.custom_sparsity[pattern]
            if custom_weights.get(n, value) != value:
                raise ValueError(f"rigl.custom_sparsity: {n!r} matched by patterns with different sparsities")
            custom_weights[n] = value
    overlap = sorted(set(dense_weights) & set(custom_weights))
    if overlap:
        raise ValueError(f"rigl.dense_layers and rigl.custom_sparsity both name {overlap}")
    splits: Dict[str, Tuple[int, int]] = {}
    for pattern, hits in resolve_patterns(config.mask_groups, names, "mask_groups").items():
        split = config.mask_groups[pattern]
        for n in hits:
            shape = tuple(shapes[n])
            if split.axis >= len(shape) or shape[split.axis] % split.blocks:
                raise ValueError(
                    f"rigl.mask_groups.{pattern}: {n!r} of shape {shape} cannot be split into "
                    f"{split.blocks} equal blocks along axis {split.axis}"
                )
            if splits.get(n, (split.axis, split.blocks)) != (split.axis, split.blocks):
                raise ValueError(f"rigl.mask_groups: {n!r} matched by patterns with different splits")
            splits[n] = (split.axis, split.blocks)

    unit_shapes: Dict[str, Tuple[int, ...]] = {}
    dense_units: List[str] = []
    custom_units: Dict[str, float] = {}
    layers: List[LayerPlan] = []
    n_pools = 1 if config.distribution == "global" else 0
    for n in names:
        axis, blocks = splits.get(n, (0, 1))
        probe = LayerPlan(n, tuple(shapes[n]), axis, blocks)
        for unit in probe.unit_names:
            unit_shapes[unit] = probe.unit_shape
            if n in dense_weights:
                dense_units.append(unit)
            elif n in custom_weights:
                custom_units[unit] = custom_weights[n]
        if n in dense_weights:
            continue  # no mask at all; only its budget share matters
        pools = []
        for unit in probe.unit_names:
            if config.distribution == "global" and unit not in custom_units:
                pools.append(0)
            else:
                pools.append(n_pools)
                n_pools += 1
        layers.append(LayerPlan(n, tuple(shapes[n]), axis, blocks, tuple(pools), index=len(layers)))
    if not layers:
        raise ValueError("rigl.dense_layers: every sparsifiable weight is listed as dense; nothing left to sparsify")
    plan = SparsityPlan(config, layers, n_pools, unit_shapes, dense_units, custom_units)
    try:
        plan.targets(config.sparsity)  # the budget must be met at start-up, not discovered mid-run
    except ValueError as exc:
        raise ValueError(f"rigl.sparsity / rigl.dense_layers: {exc}") from None
    return plan
