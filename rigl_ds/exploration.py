"""Exploration metrics of a sparse run: how much of the weight space the masks have visited, and
how evenly each layer's connections spread over its output units.

* In-time over-parameterisation rate (ITOP, Liu et al. 2021): the fraction of masked entries that
  have been active at any point since the tracker started (the initial mask included).
* Fan-in spread: per layer, the coefficient of variation (std / mean) of the active inputs per
  output unit; 0 under constant fan-in, about sqrt((1 - d) / (d * fan_in)) for a random mask of density d.

Works on any storage view: every count is summed over processes with one collective per call.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from . import bits
from .fan_in import coefficient_of_variation, fan_in_counts


class ExplorationTracker:
    """Follows a controller's masks (a mask listener) and reports ITOP and fan-in spread."""

    def __init__(self, controller, out_axes: Optional[Mapping[str, int]] = None):
        self.controller = controller
        self.out_axes = dict(out_axes or {})
        self.ever = [s.mask_bits.clone() for s in controller.shards]
        controller.mask_listeners.append(self.masks_changed)

    def masks_changed(self) -> None:
        for i, s in enumerate(self.controller.shards):
            self.ever[i] = self.ever[i].to(s.mask_bits.device) | s.mask_bits

    def itop_rate(self) -> float:
        """Fraction of all masked entries (every process's) ever active since the start."""
        shards = self.controller.shards
        home = shards[0].device if shards else torch.device("cpu")
        local = torch.zeros(2, dtype=torch.float64, device=home)
        for s, ever in zip(shards, self.ever):
            local[0] += float(bits.count(ever))
            local[1] += s.numel
        total = self.controller.comm.all_reduce_sum(local)
        return float(total[0] / total[1]) if float(total[1]) else 0.0

    def fan_in_cv(self) -> Dict[str, float]:
        """Per masked layer: std / mean of its output units' fan-ins, over the whole layer."""
        # One row of counts per planned layer, in plan order, so every process's vector lines up
        # whichever layers (or parts of them) it holds.
        layers = self.controller.plan.layers
        shards = self.controller.shards
        home = shards[0].device if shards else torch.device("cpu")
        rows = {layer.name: torch.zeros(layer.shape[self.out_axes.get(layer.name, 0)], dtype=torch.float64, device=home)
                for layer in layers}
        for s in shards:
            axis = self.out_axes.get(s.layer.name, 0)
            rows[s.layer.name] += fan_in_counts(s.layer, axis, s.mask, s.offset).to(home, torch.float64)
        counts = self.controller.comm.all_reduce_sum(torch.cat([rows[layer.name] for layer in layers]))
        out, start = {}, 0
        for layer in layers:
            n = rows[layer.name].numel()
            out[layer.name] = coefficient_of_variation(counts[start : start + n])
            start += n
        return out

    def summary(self) -> Dict[str, float]:
        """``itop_rate``, the mean and the largest per-layer fan-in CV: the columns logs and the study keep."""
        cv = self.fan_in_cv()
        values = list(cv.values()) or [0.0]
        return {
            "itop_rate": self.itop_rate(),
            "fan_in_cv_mean": sum(values) / len(values),
            "fan_in_cv_max": max(values),
        }
