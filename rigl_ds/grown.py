"""Optimizer steps of newly grown entries (``grow_bias_correction``, ``grow_warmup_steps``).

A grown entry starts with zero Adam moments, but Adam divides them by bias corrections of the
*global* step count t: after k steps of its own, the entry's update is
``(1 - b1^t)/(1 - b1^k) * sqrt((1 - b2^k)/(1 - b2^t))`` times smaller than Adam's own rule would
make it for a fresh parameter -- or, read the other way, the global rule gives it an update several
times the learning rate (about 4x at k = 10, t = 600 with the default betas) for hundreds of steps.

* ``grow_bias_correction: "per_entry"`` recomputes each grown entry's step with its own count k
  (Adam / AdamW from torch, exact to rounding: the same formula torch uses, k for t).
* ``grow_warmup_steps: W`` scales each grown entry's optimizer update by ``min(1, k / W)``
  (any optimizer: it rescales the weight change the step made).

Both act after ``optimizer.step()`` on the entries grown since the start, from a snapshot taken just
before it; entries active from initialisation are never touched. The per-entry step count at
growth is an int32 per masked entry; ``state_dict`` / ``load_state_dict`` carry it (and the step
count) through the plain path's checkpoint (``SparseTraining.state_dict()["grown"]``), so a resumed
run takes the same steps as an uninterrupted one. A checkpoint without it (older ones) loads with
every active entry counting as old. Single-process path only (``config.SINGLE_PROCESS_KEYS``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .config import RigLConfig
from .shards import ParamRangeShard


class GrownEntrySteps:
    """Tracks when each masked entry was grown and corrects the optimizer steps of grown ones."""

    def __init__(self, config: RigLConfig, shards: Sequence[ParamRangeShard], optimizer: torch.optim.Optimizer):
        self.per_entry = config.grow_bias_correction == "per_entry"
        self.warmup = config.grow_warmup_steps
        if self.per_entry and not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam in torch >= 2.5
            raise ValueError(
                "rigl.grow_bias_correction: 'per_entry' restarts Adam's bias correction, so it needs "
                f"torch.optim.Adam or AdamW, got {type(optimizer).__name__}; use grow_warmup_steps instead"
            )
        self.shards = list(shards)
        self.optimizer = optimizer
        self.steps_taken = 0  # optimizer steps applied since the start
        # Per entry: steps_taken when it was last grown, or -1 (active from the start, or never grown).
        self.born = [
            torch.full((s.numel,), -1, dtype=torch.int32, device=s.device) for s in (self.shards if self.active else [])
        ]
        self._previous: List[Optional[torch.Tensor]] = [None] * len(self.shards)
        self._snapshot: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = []

    @property
    def active(self) -> bool:
        return self.per_entry or self.warmup > 0

    def masks_changed(self) -> None:
        """A mask listener: entries active now and not before were grown at this step."""
        for i, s in enumerate(self.shards):
            now = s.mask
            if self._previous[i] is not None:
                grown = now & ~self._previous[i]
                self.born[i].masked_fill_(grown, self.steps_taken)
            self._previous[i] = now

    def forget(self) -> None:
        """Every active entry counts as old from here (after a checkpoint load)."""
        for born in self.born:
            born.fill_(-1)
        self._previous = [s.mask for s in self.shards]

    def state_dict(self) -> dict:
        """The step count and each entry's growth step (copies), for the plain path's checkpoint."""
        return {"steps_taken": self.steps_taken, "born": [b.clone() for b in self.born]}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``; the masks must be loaded first (they are the new baseline)."""
        born = state["born"]
        if len(born) != len(self.born):
            raise ValueError(f"grown-entry state has {len(born)} layers, this model {len(self.born)}")
        for i, (mine, saved) in enumerate(zip(self.born, born)):
            if saved.numel() != mine.numel():
                raise ValueError(f"grown-entry state of layer {i}: {saved.numel()} entries, this shard {mine.numel()}")
            mine.copy_(saved.to(device=mine.device, dtype=mine.dtype))
        self.steps_taken = int(state["steps_taken"])
        self._previous = [s.mask for s in self.shards]

    def before_step(self) -> None:
        """Snapshot the weights of grown entries the coming step will move."""
        self._snapshot = []
        for s, born, mask in zip(self.shards, self.born, self._previous):
            young = born >= 0
            if self.warmup > 0 and not self.per_entry:
                young &= (self.steps_taken - born) < self.warmup
            if mask is not None:
                young &= mask
            index = young.nonzero().squeeze(1)
            self._snapshot.append((index, s.weight.index_select(0, index).clone()) if index.numel() else None)

    def after_step(self) -> None:
        """Rewrite the grown entries' step: Adam's rule with their own step count, then the warm-up."""
        self.steps_taken += 1
        for s, born, snap in zip(self.shards, self.born, self._snapshot):
            if snap is None:
                continue
            index, before = snap
            k = (self.steps_taken - born.index_select(0, index)).to(before.dtype)  # >= 1
            after = s.weight.index_select(0, index)
            if self.per_entry:
                after = self._adam_step(s, index, before, k)
            if self.warmup > 0:
                after = before + (after - before) * (k / self.warmup).clamp(max=1.0)
            s.weight.index_copy_(0, index, after.to(s.weight.dtype))
        self._snapshot = []

    def _adam_step(
        self, s: ParamRangeShard, index: torch.Tensor, before: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        """The step torch's Adam/AdamW takes for a parameter whose step count is ``k``, applied to
        ``before`` with the moments the step just wrote."""
        group = next(g for g in self.optimizer.param_groups if any(p is s.param for p in g["params"]))
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("rigl.grow_bias_correction: 'per_entry' supports Adam without amsgrad or maximize")
        state = self.optimizer.state[s.param]
        m = s._range(state["exp_avg"]).index_select(0, index)
        v = s._range(state["exp_avg_sq"]).index_select(0, index)
        lr, (b1, b2), eps = float(group["lr"]), group["betas"], group["eps"]
        decoupled = group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))
        start = before * (1.0 - lr * group["weight_decay"]) if decoupled and group["weight_decay"] else before
        c1 = 1.0 - torch.pow(torch.as_tensor(b1, dtype=k.dtype), k)
        c2 = 1.0 - torch.pow(torch.as_tensor(b2, dtype=k.dtype), k)
        return start - lr * (m / c1) / (v.sqrt() / c2.sqrt() + eps)
