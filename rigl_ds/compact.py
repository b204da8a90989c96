"""Optimizer state for active entries only: Adam / AdamW whose moments live at a set of positions.

``CompactAdam`` is ``torch.optim.Adam`` (``decoupled_weight_decay=True``: ``AdamW``) with one
difference: for each parameter tensor it steps, the moments are kept only at a sorted set of
"stateful" positions (``set_stateful``), and only those entries are stepped. With every position
stateful (the default) it is torch's single-tensor (``foreach=False``) Adam, operation for operation,
so results are bit-identical. Under masks the positions are the active entries: a masked entry has
zero weight, zero gradient and zero moments, and torch's dense Adam leaves it at exactly zero, so
leaving it out changes no bit of any weight.

State per parameter (``self.state[p]``), a superset of torch's Adam keys:

- ``step``: as torch's (a float scalar tensor, one per parameter tensor).
- ``exp_avg``, ``exp_avg_sq``: shape ``p.shape`` when every position is stateful (then also torch's
  layout), else 1-D with one value per stateful position, in position order.
- ``positions`` (only when packed): the stateful flat indices, sorted, int32 below 2**31 entries.

DeepSpeed links optimizer-state fragments only for state tensors of the flat partition's shape, so
packed moments are never mis-sliced by it (and never reachable through ``safe_get_*_optimizer_state``);
they are saved and restored whole with the torch state dict, per rank.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch.optim.optimizer import _get_scalar_dtype

_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def repack(
    values: torch.Tensor, old: Optional[torch.Tensor], new: Optional[torch.Tensor], numel: int, shape
) -> torch.Tensor:
    """``values`` held at positions ``old`` re-laid at positions ``new`` (None: every position, in
    ``shape``): positions in both keep their value, positions only in ``new`` start at zero."""
    if old is None and new is None:
        return values
    if old is None:
        return values.reshape(-1).index_select(0, new)
    if new is None:
        out = values.new_zeros(numel)
        out.index_put_((old,), values)
        return out.view(shape)
    out = values.new_zeros(new.numel())
    if old.numel() == 0 or new.numel() == 0:
        return out
    where = torch.searchsorted(old, new.to(old.dtype)).clamp_(max=old.numel() - 1)
    found = old[where] == new
    out[found] = values[where[found]]
    return out


class CompactAdam(torch.optim.Optimizer):
    """Adam / AdamW (``decoupled_weight_decay``) with moments only at each tensor's stateful positions.

    Supports torch Adam's defaults only: no amsgrad, foreach, fused, capturable or differentiable."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer) -> "CompactAdam":
        """The compact twin of a fresh ``torch.optim.Adam`` / ``AdamW`` (same param groups and
        hyper-parameters). Refuses options whose arithmetic this class does not reproduce."""
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            raise TypeError(f"can convert torch.optim.Adam or AdamW only, got {type(optimizer).__name__}")
        if any(optimizer.state.values()):
            raise ValueError("convert the optimizer before its first step (it already has state)")
        groups = []
        for g in optimizer.param_groups:
            for opt in ("amsgrad", "capturable", "differentiable"):
                if g.get(opt):
                    raise ValueError(f"CompactAdam does not support {opt}=True")
            if g.get("fused") or g.get("foreach"):
                raise ValueError("CompactAdam reproduces the single-tensor path: foreach and fused must be off")
            groups.append(
                {
                    "params": list(g["params"]),
                    "lr": g["lr"],
                    "betas": g["betas"],
                    "eps": g["eps"],
                    "weight_decay": g["weight_decay"],
                    "decoupled_weight_decay": bool(
                        g.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
                    ),
                    "maximize": g.get("maximize", False),
                }
            )
        return cls(groups)

    # -- stateful positions ----------------------------------------------------------------------
    def stateful_positions(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The sorted flat indices stepped and given state, or None for every position."""
        return self.state[param].get("positions") if param in self.state else None

    def set_stateful(self, param: torch.Tensor, positions: Optional[torch.Tensor]) -> None:
        """Makes ``positions`` (sorted, unique flat indices; None: all) the stateful set of ``param``.
        Positions that stay keep their moments, new ones start at zero, dropped ones are freed."""
        numel = param.numel()
        if positions is not None:
            positions = positions.reshape(-1)
            if positions.is_floating_point() or positions.dtype == torch.bool:
                raise TypeError(f"positions must be integer indices, got {positions.dtype}")
            if positions.numel() == numel:
                positions = None  # every position: torch's own layout
            else:
                positions = positions.to(device=param.device, dtype=_index_dtype(numel))
                if positions.numel() and (
                    int(positions[0]) < 0
                    or int(positions[-1]) >= numel
                    or not bool((positions[1:] > positions[:-1]).all())
                ):
                    raise ValueError(f"positions must be sorted, unique and in [0, {numel})")
        state = self.state[param]
        old = state.get("positions")
        if old is None and positions is None:
            return
        if old is not None and positions is not None and torch.equal(old, positions):
            return
        for key in _STATE_KEYS:
            if key in state:
                state[key] = repack(state[key], old, positions, numel, param.shape)
        if positions is None:
            state.pop("positions", None)
        else:
            state["positions"] = positions

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, positions, step counters)."""
        return sum(
            v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            lr = lr.item() if isinstance(lr, torch.Tensor) else lr
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CompactAdam does not support sparse gradients")
                self._step_one(p, group, lr, beta1, beta2)
        return loss

    def _step_one(self, p: torch.Tensor, group: Dict[str, Any], lr: float, beta1: float, beta2: float) -> None:
        state = self.state[p]
        positions = state.get("positions")
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            for key in _STATE_KEYS:
                if positions is None:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state[key] = torch.zeros(positions.numel(), dtype=p.dtype, device=p.device)
        if positions is None:
            param, grad = p, p.grad
        else:
            if not p.is_contiguous():
                raise ValueError("CompactAdam: packed state needs contiguous parameters")
            param = p.view(-1).index_select(0, positions)
            grad = p.grad.reshape(-1).index_select(0, positions)
        if group["maximize"]:
            grad = -grad
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        weight_decay, eps = group["weight_decay"], group["eps"]

        # torch/optim/adam.py _single_tensor_adam (capturable=False, differentiable=False), in its order.
        step_t += 1
        if weight_decay != 0:
            if group["decoupled_weight_decay"]:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

        if positions is not None:
            p.view(-1).index_put_((positions,), param)

    # -- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's, except that ``positions`` keep their integer dtype (torch casts every non-step
        state tensor to the parameter's dtype, which would round indices above 2**24)."""
        saved = state_dict["state"]
        positions = {k: v["positions"] for k, v in saved.items() if isinstance(v, dict) and "positions" in v}
        stripped = dict(state_dict)
        stripped["state"] = {
            k: ({kk: vv for kk, vv in v.items() if kk != "positions"} if isinstance(v, dict) else v)
            for k, v in saved.items()
        }
        super().load_state_dict(stripped)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(ids, params))
        for k, pos in positions.items():
            p = by_id[k]
            self.state[p]["positions"] = pos.to(device=p.device, dtype=_index_dtype(p.numel()))


class CompactAdamW(CompactAdam):
    """``torch.optim.AdamW`` with compact state: ``CompactAdam`` with decoupled weight decay."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        maximize: bool = False,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True, maximize=maximize)
