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
- the stateful set, only when packed, in whichever layout is smaller: ``bitmap`` (uint8, one bit per
  entry of ``p``, as ``rigl_ds.bits`` packs it) when at least 1 in 32 entries is stateful (1 in 64
  above 2**31 entries), else ``positions`` (the sorted flat indices, int32 below 2**31 entries). At
  90% sparsity the bitmap costs 0.125 bytes per entry of ``p`` where int32 positions would cost 0.4.
- ``master`` (only with ``master_weights=True`` and a low-precision ``p``): fp32 copies of the
  stateful entries, which the step updates and rounds into ``p``, with fp32 moments. This is ZeRO's
  mixed-precision arithmetic with the master kept for active entries only, for DeepSpeed's
  ``bf16_master_weights_and_grads`` (then ZeRO keeps no fp32 copy of its own). Entries that become
  stateful start from the weight as it stands, as ZeRO's master does at the start.

DeepSpeed links optimizer-state fragments only for state tensors of the flat partition's shape, so
packed moments are never mis-sliced by it (and never reachable through ``safe_get_*_optimizer_state``);
they are saved and restored whole with the torch state dict, per rank.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch.optim.optimizer import _get_scalar_dtype

from . import bits

LAYOUT_KEYS = ("positions", "bitmap")  # the stateful set: not per-entry state


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def repack(
    values: torch.Tensor,
    old: Optional[torch.Tensor],
    new: Optional[torch.Tensor],
    numel: int,
    shape,
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``values`` held at positions ``old`` re-laid at positions ``new`` (None: every position, in
    ``shape``): positions in both keep their value, positions only in ``new`` start at zero, or at
    ``fill`` (a flat tensor of ``numel`` entries) there."""
    if old is None and new is None:
        return values
    if old is None:
        return values.reshape(-1).index_select(0, new)
    if new is None:
        out = values.new_zeros(numel) if fill is None else fill.to(values.dtype, copy=True)
        out.index_put_((old,), values)
        return out.view(shape)
    if fill is None:
        out = values.new_zeros(new.numel())
    else:
        out = fill.index_select(0, new).to(values.dtype)
    if old.numel() == 0 or new.numel() == 0:
        return out
    where = torch.searchsorted(old, new.to(old.dtype)).clamp_(max=old.numel() - 1)
    found = old[where] == new
    out[found] = values[where[found]]
    return out


class CompactOptimizer(torch.optim.Optimizer):
    """Per-entry optimizer state only at each tensor's stateful set (and fp32 masters, on request).

    Subclasses name their per-entry state (``state_keys``) and give the update of one tensor
    (``_update``), written as torch's single-tensor step so that the dense layout is torch's."""

    state_keys: Tuple[str, ...] = ()
    master_weights: bool = False

    def _keeps_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.is_floating_point() and p.dtype != torch.float32

    # -- stateful positions ----------------------------------------------------------------------
    def stateful_positions(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The sorted flat indices stepped and given state, or None for every position."""
        return _positions(self.state[param], param.numel()) if param in self.state else None

    def master_range(self, param: torch.Tensor, start: int, numel: int) -> Optional[torch.Tensor]:
        """fp32 values of ``param``'s entries [start, start + numel): the master copy where there is
        one, the weight elsewhere (zero there under masks). None before the first step, when no
        master exists yet and the weight is all there is."""
        state = self.state.get(param, {})
        master = state.get("master")
        if master is None:
            return None
        if "bitmap" not in state and "positions" not in state:
            return master.reshape(-1).narrow(0, start, numel)
        out = param.detach().reshape(-1).narrow(0, start, numel).to(torch.float32, copy=True)
        if "bitmap" in state:
            first = bits.count_before(state["bitmap"], start)
            here = bits.unpack_range(state["bitmap"], start, numel)
            out[here] = master.narrow(0, first, int(here.sum()))
        else:
            positions = state["positions"]
            bounds = torch.tensor([start, start + numel], dtype=positions.dtype, device=positions.device)
            lo, hi = torch.searchsorted(positions, bounds).tolist()
            out[(positions[lo:hi] - start).long()] = master[lo:hi]
        return out

    def set_stateful(self, param: torch.Tensor, stateful: Optional[torch.Tensor]) -> None:
        """Makes ``stateful`` the stateful set of ``param``: a bool tensor of ``param.numel()`` entries,
        or sorted unique flat indices, or None for all. Entries that stay keep their moments, new
        ones start at zero, dropped ones are freed."""
        numel = param.numel()
        new_key, new = None, None
        if stateful is not None:
            stateful = stateful.reshape(-1)
            mask = positions = None
            if stateful.dtype == torch.bool:
                if stateful.numel() != numel:
                    raise ValueError(f"a stateful mask needs {numel} entries, got {stateful.numel()}")
                mask = stateful.to(param.device)
                n = int(mask.sum())
            elif stateful.is_floating_point():
                raise TypeError(f"positions must be integer indices or a bool mask, got {stateful.dtype}")
            else:
                positions = stateful.to(device=param.device, dtype=_index_dtype(numel))
                if positions.numel() and (
                    int(positions[0]) < 0
                    or int(positions[-1]) >= numel
                    or not bool((positions[1:] > positions[:-1]).all())
                ):
                    raise ValueError(f"positions must be sorted, unique and in [0, {numel})")
                n = positions.numel()
            if n < numel:
                index_bytes = torch.empty((), dtype=_index_dtype(numel)).element_size()
                if bits.packed_numel(numel) <= n * index_bytes:
                    if mask is None:
                        mask = torch.zeros(numel, dtype=torch.bool, device=param.device)
                        mask[positions.long()] = True
                    new_key, new = "bitmap", bits.pack(mask)
                else:
                    if positions is None:
                        positions = mask.nonzero().view(-1).to(_index_dtype(numel))
                    new_key, new = "positions", positions
        state = self.state[param]
        old_key = next((k for k in LAYOUT_KEYS if k in state), None)
        if old_key == new_key and (new is None or torch.equal(state[old_key], new)):
            return
        if any(key in state for key in (*self.state_keys, "master")):
            old_pos, new_pos = _positions(state, numel), None
            if new_key is not None:
                new_pos = _positions({new_key: new}, numel)
            for key in self.state_keys:
                if key in state:
                    state[key] = repack(state[key], old_pos, new_pos, numel, param.shape)
            if "master" in state:  # entries that become stateful take the weight as it stands
                fill = param.detach().reshape(-1)
                state["master"] = repack(state["master"], old_pos, new_pos, numel, param.shape, fill=fill)
        for key in LAYOUT_KEYS:
            state.pop(key, None)
        if new_key is not None:
            state[new_key] = new

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, master copies, stateful sets, step counters)."""
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
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._step_one(p, group)
        return loss

    def _step_one(self, p: torch.Tensor, group: Dict[str, Any]) -> None:
        state = self.state[p]
        positions, mask = state.get("positions"), None
        if "bitmap" in state:
            mask = bits.unpack(state["bitmap"], p.numel())  # one transient bool tensor per step
        keep_master = self._keeps_master(p)
        packed = positions is not None or mask is not None
        if packed and not p.is_contiguous():
            raise ValueError(f"{type(self).__name__}: packed state needs contiguous parameters")
        if keep_master and "master" not in state:
            # As ZeRO's own fp32 master, which it builds from the low-precision partition.
            state["master"] = _gather(p.detach(), positions, mask).to(torch.float32, copy=True)
        grad = _gather(p.grad, positions, mask)
        if keep_master:
            param, grad = state["master"], grad.to(torch.float32)
        elif packed:
            param = _gather(p, positions, mask)
        else:
            param = p
        self._update(param, grad, state, group)
        if keep_master or packed:
            _scatter(p, param.to(p.dtype), positions, mask)

    # -- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's, except that the stateful set keeps its integer dtype and, with master weights,
        moments and master copies stay fp32 (torch casts every non-step state tensor to the
        parameter's dtype, which would round indices above 2**24 and the master to bf16)."""
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(ids, params))
        raw: Dict[Any, Dict[str, torch.Tensor]] = {}
        stripped_state = {}
        for k, v in state_dict["state"].items():
            if isinstance(v, dict) and k in by_id:
                keep = LAYOUT_KEYS + ((*self.state_keys, "master") if self._keeps_master(by_id[k]) else ())
                raw[k] = {kk: vv for kk, vv in v.items() if kk in keep}
                v = {kk: vv for kk, vv in v.items() if kk not in keep}
            stripped_state[k] = v
        super().load_state_dict({**state_dict, "state": stripped_state})
        for k, tensors in raw.items():
            p = by_id[k]
            for kk, v in tensors.items():
                if kk == "bitmap":
                    dtype = torch.uint8
                elif kk == "positions":
                    dtype = _index_dtype(p.numel())
                else:
                    dtype = torch.float32
                self.state[p][kk] = v.to(device=p.device, dtype=dtype)


class CompactAdam(CompactOptimizer):
    """Adam / AdamW (``decoupled_weight_decay``) with moments only at each tensor's stateful positions.

    Supports torch Adam's defaults only: no amsgrad, foreach, fused, capturable or differentiable."""

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        master_weights: bool = False,
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
        self.master_weights = bool(master_weights)

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, master_weights: bool = False) -> "CompactAdam":
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
        return cls(groups, master_weights=master_weights)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            for key in self.state_keys:  # param's layout: p's shape, or one entry per stateful position
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["maximize"]:
            grad = -grad
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        weight_decay, eps = group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        lr = lr.item() if isinstance(lr, torch.Tensor) else lr

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


class CompactSGD(CompactOptimizer):
    """``torch.optim.SGD`` with its momentum buffer only at each tensor's stateful positions.

    Supports torch SGD's single-tensor path: no foreach, fused or differentiable."""

    state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        master_weights: bool = False,
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        self.master_weights = bool(master_weights)

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, master_weights: bool = False) -> "CompactSGD":
        """The compact twin of a fresh ``torch.optim.SGD`` (same param groups and hyper-parameters)."""
        if type(optimizer) is not torch.optim.SGD:
            raise TypeError(f"can convert torch.optim.SGD only, got {type(optimizer).__name__}")
        if any(optimizer.state.values()):
            raise ValueError("convert the optimizer before its first step (it already has state)")
        groups = []
        for g in optimizer.param_groups:
            if g.get("fused") or g.get("foreach") or g.get("differentiable"):
                raise ValueError("CompactSGD reproduces the single-tensor path: foreach, fused, differentiable off")
            keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
            groups.append({"params": list(g["params"]), **{k: g[k] for k in keys}})
        return cls(groups, master_weights=master_weights)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        # torch/optim/sgd.py _single_tensor_sgd, in its order.
        lr = group["lr"]
        lr = lr.item() if isinstance(lr, torch.Tensor) else lr
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        param.add_(grad, alpha=-lr)


def _gather(t: torch.Tensor, positions: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The stateful entries of ``t`` in flat index order (``t`` itself when every entry is)."""
    if positions is not None:
        return t.reshape(-1).index_select(0, positions)
    if mask is not None:  # masked_select: the same entries in the same order
        return t.reshape(-1)[mask]
    return t


def _scatter(p: torch.Tensor, values: torch.Tensor, positions: Optional[torch.Tensor], mask: Optional[torch.Tensor]):
    if positions is not None:
        p.view(-1).index_put_((positions,), values)
    elif mask is not None:
        p.view(-1).masked_scatter_(mask, values)
    else:
        p.copy_(values)


def _positions(state: Dict[str, Any], numel: int) -> Optional[torch.Tensor]:
    """The stateful set of one parameter's state as sorted flat indices (None: every entry)."""
    if "bitmap" in state:
        return bits.unpack(state["bitmap"], numel).nonzero().view(-1).to(_index_dtype(numel))
    return state.get("positions")


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
        master_weights: bool = False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            decoupled_weight_decay=True,
            maximize=maximize,
            master_weights=master_weights,
        )
