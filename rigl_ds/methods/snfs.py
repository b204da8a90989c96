"""SNFS (Dettmers & Zettlemoyer 2019), as in the RigL paper's comparison: grow where the
exponential moving average of the dense gradient (decay ``grad_ema_decay``) is largest."""

from typing import Callable, Dict, List, Sequence

import torch

from ..shards import Shard
from .base import DropGrowMethod, dense_gradients
from .registry import register


@register("snfs")
class SNFSMethod(DropGrowMethod):
    uses_gradients = True
    tracks_gradients = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ema: Dict[str, torch.Tensor] = {}

    def observe_gradients(self, shards: Sequence[Shard], step: int) -> None:
        decay = self.config.grad_ema_decay
        # Loss-scaled gradients (fp16) would re-weight the history at every change of the scale.
        weight = (1.0 - decay) / self.gradient_scale
        for s, g in zip(shards, dense_gradients(shards, self.name, step)):
            ema = self._ema.get(s.layer.name)
            if ema is None:
                ema = self._ema[s.layer.name] = torch.zeros(s.numel, dtype=torch.float32, device=g.device)
            ema.mul_(decay).add_(g.float(), alpha=weight)

    def grow_scores(self, shards: Sequence[Shard], step: int) -> List[Callable[[], torch.Tensor]]:
        def score(s: Shard) -> torch.Tensor:
            ema = self._ema.get(s.layer.name)
            return ema.abs() if ema is not None else torch.zeros(s.numel, device=s.device)

        return [lambda s=s: score(s) for s in shards]

    def state_dict(self, shards: Sequence[Shard]) -> Dict[str, torch.Tensor]:
        return {f"grad_ema.{name}": t.clone() for name, t in self._ema.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], shards: Sequence[Shard]) -> None:
        by_name = {s.layer.name: s for s in shards}
        self._ema = {}
        for key, value in state.items():
            name = key.removeprefix("grad_ema.")
            if name not in by_name or value.numel() != by_name[name].numel:
                raise ValueError(f"SNFS state {key!r} does not fit this model's shards")
            # Beside the shard it scores (a checkpoint is read to the CPU; the shard may be on a GPU).
            self._ema[name] = value.to(device=by_name[name].device, dtype=torch.float32, copy=True)
