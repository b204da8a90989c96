"""A pretend accelerator on the CPU, and collectives that carry one device only, as NCCL does.

Inside ``FakeAccelerator()``, tensors created on or moved to ``ACCEL`` report that device but keep
their values in CPU storage, and every op checks what CUDA checks: the tensors it takes sit on one
device. The exceptions are CUDA's own: CPU scalars (0-dim) in pointwise ops, CPU indices into an
accelerator tensor, and the explicit crossings ``.to()`` and ``copy_``. Code that mixes a host mask
with an accelerator copy then fails here as it would on a GPU. ``ACCEL`` is the ``lazy`` device
type, which this CPU build has no kernels for, so a tensor escaping the harness fails too.

``RecordedCollectives`` stands in for torch.distributed's tensor collectives (the real gloo ones
run underneath): it records every payload's device and refuses, with NCCL's message, a payload
that is not on the device its backend carries.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

ACCEL = torch.device("lazy", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class OnAccel(torch.Tensor):
    """A CPU tensor (``inner``) that says it lives on ``ACCEL``; views and in-place ops reach ``inner``."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=ACCEL,
        )

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnAccel({self.inner!r})"

    def tolist(self):  # a device tensor's tolist copies to the host; the wrapper has no storage of its own
        return self.inner.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class DeviceMismatch(RuntimeError):
    pass


def _is_accel(device: Any) -> bool:
    return device is not None and torch.device(device).type == ACCEL.type


def _inner(x: Any) -> Any:
    return x.inner if isinstance(x, OnAccel) else x


def _device_of(t: torch.Tensor) -> torch.device:
    return ACCEL if isinstance(t, OnAccel) else t.device


def _check_one_device(func, args, kwargs) -> bool:
    """Raises as CUDA would when ``func``'s tensors sit on two devices; True when one is ACCEL."""
    exempt_scalars = torch.Tag.pointwise in func.tags or func.name().startswith(
        ("aten::where", "aten::masked_fill", "aten::fill")
    )
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if func in _INDEX_OPS and isinstance(args[0], OnAccel):
        index_leaves = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)}
        tensors = [t for t in tensors if not (id(t) in index_leaves and t.device == CPU)]
    devices = {_device_of(t) for t in tensors if not (exempt_scalars and t.dim() == 0 and not isinstance(t, OnAccel))}
    if len(devices) > 1:
        raise DeviceMismatch(
            f"Expected all tensors to be on the same device, but found at least two devices, "
            f"{', '.join(sorted(str(d) for d in devices))}! (in {func.name()})"
        )
    return ACCEL in devices


def _wrap_outputs(out: Any, args, kwargs) -> Any:
    """Outputs as ACCEL tensors; an output that is an argument's storage (in place, ``out=``)
    comes back as that argument's wrapper."""
    wrappers = {id(t.inner): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, OnAccel)}

    def wrap(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return wrappers[id(x)] if id(x) in wrappers else OnAccel(x)

    return tree_map(wrap, out)


def _run(func, args, kwargs):
    if func is aten._to_copy.default:
        src = args[0]
        target = kwargs.get("device")
        to_accel = _is_accel(target) if target is not None else isinstance(src, OnAccel)
        out = func(_inner(src), **dict(kwargs, device=CPU))
        return OnAccel(out) if to_accel else out
    if func is aten.copy_.default:  # crosses devices, as copy_ does on an accelerator
        _inner(args[0]).copy_(_inner(args[1]), *args[2:])
        return args[0]
    if kwargs.get("device") is not None:  # a factory, or new_* / *_like told where its result goes
        on_accel = _is_accel(kwargs["device"])
        kwargs = dict(kwargs, device=CPU)
    else:
        on_accel = _check_one_device(func, args, kwargs)
    out = func(*tree_map(_inner, args), **tree_map(_inner, kwargs))
    return _wrap_outputs(out, args, kwargs) if on_accel else out


class FakeAccelerator(TorchDispatchMode):
    """Every op inside runs through ``_run``: factories and copies can target ACCEL, and device
    rules are checked on plain CPU tensors too (a host tensor meeting an ACCEL one)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    def __enter__(self):
        # torch.tensor(data, device=ACCEL) then builds on the host and moves through the mode, as
        # under FakeTensorMode, instead of allocating on a device type this build cannot serve.
        self._lift_cpu = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch._C._set_only_lift_cpu_tensors(self._lift_cpu)
        return super().__exit__(*exc)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every ACCEL tensor replaced by a plain CPU copy (to hand results back)."""
    return tree_map(lambda x: x.inner.clone() if isinstance(x, OnAccel) else x, obj)


_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "broadcast",
    "reduce_scatter",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
)


class RecordedCollectives:
    """Replaces torch.distributed's tensor collectives while active: each payload's device is
    recorded, a payload off ``comm_device`` raises as NCCL raises for a host tensor, and the real
    gloo collective then runs on the CPU storage."""

    def __init__(self, comm_device: torch.device):
        self.comm_device = torch.device(comm_device)
        self.calls: List[Dict[str, Any]] = []

    def _wrap(self, name: str, real):
        def collective(*args, **kwargs):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            devices = [_device_of(t) for t in tensors]
            self.calls.append({"op": name, "devices": [str(d) for d in devices]})
            wrong = [d for d in devices if d != self.comm_device]
            if wrong:
                raise DeviceMismatch(
                    f"{name}: No backend type associated with device type {wrong[0].type} "
                    f"(this group carries {self.comm_device} tensors only)"
                )
            with _disable_current_modes():
                return real(*tree_map(_inner, args), **tree_map(_inner, kwargs))

        return collective

    @contextlib.contextmanager
    def active(self) -> Iterator["RecordedCollectives"]:
        saved = {name: getattr(dist, name) for name in _COLLECTIVES}
        try:
            for name, real in saved.items():
                setattr(dist, name, self._wrap(name, real))
            yield self
        finally:
            for name, real in saved.items():
                setattr(dist, name, real)
