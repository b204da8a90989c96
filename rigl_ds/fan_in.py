"""Constant fan-in (SRigL, Lasby et al. 2023) and N:M masks as pools: every output unit of a layer
(or every group of M consecutive inputs of it) is its own pool with an exact target, so drop, grow
and initialisation keep each unit's fan-in constant with the selection code unchanged.

The per-unit plan is derived from the ordinary plan: the layer's (or mask group's) target from the
distribution, split evenly over its output units (``round(target / units)``, at least 1, so the
total differs from the unstructured budget by under one entry per unit). Under ``n_m = [N, M]``
every group of M consecutive inputs of every unit holds exactly N. Pools are a function of an
entry's global index, as the sharded selection needs; the per-unit pool count (n_pools x 4096
radix counts) is why the sharded path refuses these options for now (``adapter.refuse_single_process_keys``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .plan import LayerPlan, SparsityPlan


@dataclass(frozen=True)
class UnitLayerPlan(LayerPlan):
    """A layer whose pools are its output units (``out_axis``), or N:M groups of each unit's inputs."""

    out_axis: int = 0
    group: int = 0  # M of N:M; 0: the whole unit is one pool

    @property
    def n_units(self) -> int:
        return self.shape[self.out_axis]

    @property
    def fan_in(self) -> int:
        return self.numel // self.n_units

    @property
    def groups_per_unit(self) -> int:
        return self.fan_in // self.group if self.group else 1

    def unit_of(self, index: torch.Tensor) -> torch.Tensor:
        """Output unit of each global flat index."""
        inner = math.prod(self.shape[self.out_axis + 1 :])
        return (index // inner) % self.n_units

    def input_of(self, index: torch.Tensor) -> torch.Tensor:
        """Position of each entry among its unit's inputs (row-major over the other axes)."""
        inner = math.prod(self.shape[self.out_axis + 1 :])
        return (index // (inner * self.n_units)) * inner + index % inner

    def pool_ids(self, index: torch.Tensor) -> torch.Tensor:
        local = self.unit_of(index) * self.groups_per_unit
        if self.group:
            local = local + self.input_of(index) // self.group
        return local + self.pools[0]


@dataclass
class UnitPlan(SparsityPlan):
    """The plan of ``parent`` with one pool per output unit (or per N:M group)."""

    parent: Optional[SparsityPlan] = None
    n_m: Optional[Tuple[int, int]] = None

    def targets(self, sparsity: float) -> torch.Tensor:
        out = torch.zeros(self.n_pools, dtype=torch.long)
        parent = self.parent.targets(sparsity)
        for layer, parent_layer in zip(self.layers, self.parent.layers):
            units_per_block = layer.n_units // parent_layer.blocks
            for block, parent_pool in enumerate(parent_layer.pools):
                if self.n_m is not None:
                    per_pool = self.n_m[0]
                else:
                    per_pool = int(round(int(parent[parent_pool]) / units_per_block))
                    per_pool = min(layer.fan_in, max(1 if int(parent[parent_pool]) > 0 else 0, per_pool))
                first = layer.pools[0] + block * units_per_block * layer.groups_per_unit
                out[first : first + units_per_block * layer.groups_per_unit] = per_pool
        return out

    def pool_sizes(self) -> torch.Tensor:
        out = torch.zeros(self.n_pools, dtype=torch.long)
        for layer in self.layers:
            n = layer.n_units * layer.groups_per_unit
            out[layer.pools[0] : layer.pools[0] + n] = layer.group or layer.fan_in
        return out

    def subset(self, names):  # pragma: no cover - pipeline stages build plans on the sharded path only
        raise ValueError("rigl.constant_fan_in / rigl.n_m: not supported with pipeline parallelism")


def unit_plan(plan: SparsityPlan, out_axes: Mapping[str, int]) -> SparsityPlan:
    """``plan`` itself unless ``constant_fan_in`` or ``n_m`` is set; else its per-unit plan.
    ``out_axes``: each masked weight's output axis (0 for Linear/conv/RNN, 1 for GPT-2's Conv1D);
    a weight not named has axis 0. Raises ValueError naming the key when a layer cannot be split."""
    config = plan.config
    if not config.constant_fan_in and config.n_m is None:
        return plan
    key = "n_m" if config.n_m is not None else "constant_fan_in"
    group = config.n_m[1] if config.n_m is not None else 0
    layers: List[LayerPlan] = []
    n_pools = 0
    for layer in plan.layers:
        axis = out_axes.get(layer.name, 0)
        if axis not in (0, len(layer.shape) - 1):
            raise ValueError(
                f"rigl.{key}: {layer.name!r} has output axis {axis}; only the first or last axis is supported"
            )
        if layer.blocks > 1 and layer.axis != axis:
            raise ValueError(
                f"rigl.{key}: {layer.name!r} is split into mask groups along axis {layer.axis}, not its output "
                f"axis {axis}; split it along axis {axis} or drop the mask_groups entry"
            )
        probe = UnitLayerPlan(layer.name, layer.shape, axis=layer.axis, blocks=layer.blocks, out_axis=axis, group=group)
        if group and probe.fan_in % group:
            raise ValueError(f"rigl.n_m: {layer.name!r} has fan-in {probe.fan_in}, not a multiple of M = {group}")
        count = probe.n_units * probe.groups_per_unit
        layers.append(
            UnitLayerPlan(
                layer.name,
                layer.shape,
                axis=layer.axis,
                blocks=layer.blocks,
                pools=tuple(range(n_pools, n_pools + count)),
                index=layer.index,
                out_axis=axis,
                group=group,
            )
        )
        n_pools += count
    n_m = tuple(config.n_m) if config.n_m is not None else None
    return UnitPlan(
        config, layers, n_pools, plan.unit_shapes, plan.dense_units, plan.custom_units, parent=plan, n_m=n_m
    )


def fan_in_counts(layer: LayerPlan, out_axis: int, mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Active entries per output unit of ``layer`` among the flat ``mask`` entries held from
    global position ``offset`` on (a shard's counts; sum them over shards for the layer's)."""
    probe = UnitLayerPlan(layer.name, layer.shape, out_axis=out_axis)
    index = torch.arange(offset, offset + mask.numel(), device=mask.device)
    units = probe.unit_of(index[mask.reshape(-1)])
    return torch.bincount(units, minlength=probe.n_units)


def coefficient_of_variation(counts: torch.Tensor) -> float:
    """std / mean of the per-unit fan-ins (population std); 0 for an empty layer."""
    c = counts.double()
    mean = float(c.mean()) if c.numel() else 0.0
    return float(c.std(unbiased=False)) / mean if mean > 0 else 0.0


def output_axes(model: torch.nn.Module) -> Dict[str, int]:
    """Output axis of every weight of ``model`` by parameter name: GPT-2's ``Conv1D`` stores
    (in, out), so 1; every other sparsifiable weight (Linear, conv, RNN gates) has its outputs on 0."""
    return {
        f"{name}.weight" if name else "weight": 1 if type(module).__name__ == "Conv1D" else 0
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }
