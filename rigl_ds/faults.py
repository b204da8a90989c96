"""Fault injection for crash tests: ``maybe_fail(point)`` kills this process where a real crash would
hurt most, so tests can show that a killed run loses nothing.

``RIGL_DS_FAULT=<point>`` or ``<point>@<step>`` arms one point (``<step>``: the optimizer steps
completed when it is reached, as the controller counts them: ``mid-step@5`` dies inside the sixth
step, ``mid-save@8`` inside the save of ``step8``); ``RIGL_DS_FAULT_RANK=<r>`` limits it to global
rank ``r``. The process ends by SIGKILL: no ``finally``, no atexit, no flush, as when the kernel's
OOM killer or a preempted node takes it. Unset (the normal case) it costs one environment lookup.

Points: ``mid-step`` (DeepSpeed engine: after the controller's pre-step work, before DeepSpeed's
optimizer step), ``mid-update`` (inside a mask update, after the first layer's new mask is in place),
``mid-save`` (``checkpoint.save``: after DeepSpeed's files, before this rank's rigl_ds file).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

POINTS = ("mid-step", "mid-update", "mid-save")
ENV = "RIGL_DS_FAULT"
ENV_RANK = "RIGL_DS_FAULT_RANK"


def maybe_fail(point: str, step: Optional[int] = None) -> None:
    """SIGKILLs this process when ``RIGL_DS_FAULT`` names ``point`` (at ``step``, if it names one) and
    ``RIGL_DS_FAULT_RANK``, if set, names this rank. Returns at once when ``RIGL_DS_FAULT`` is unset."""
    armed = os.environ.get(ENV)
    if not armed:
        return
    name, at, when = armed.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}={armed!r}: the point must be one of {', '.join(POINTS)}")
    if name != point:
        return
    if at:
        if step is None or not when.strip().isdigit():
            raise ValueError(f"{ENV}={armed!r}: expected {point}@<step> with an integer step, at a point that knows it")
        if int(when) != step:
            return
    rank = os.environ.get(ENV_RANK)
    if rank is not None and rank.strip() != "" and int(rank) != _global_rank():
        return
    print(
        f"rigl_ds.faults: {ENV}={armed}: killing rank {_global_rank()} (pid {os.getpid()})", file=sys.stderr, flush=True
    )
    os.kill(os.getpid(), signal.SIGKILL)


def _global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
