"""When masks change and by how much: the update rule, drop-fraction decay and the GMP schedule.

Steps are optimizer steps. Formulas follow rigl/sparse_optimizers_base.py, quirks included:
the cosine decay reads the absolute step (decay length end - begin), while linear decay is
measured from begin_step.
"""

from __future__ import annotations

import math
from typing import Optional


def is_update_step(step: int, last_update: int, begin: int, end: Optional[int], delta_t: int) -> bool:
    """True when begin <= step <= end and at least delta_t steps passed since the last update.

    The last update starts at begin - delta_t, so the first update happens at ``begin``. ``end`` of
    None never stops updating. A skipped update (non-finite gradients) is retried on the next step.
    """
    if step < begin or (end is not None and step > end):
        return False
    return step >= last_update + delta_t


def drop_fraction(step: int, alpha: float, begin: int, end: int, schedule: str = "cosine") -> float:
    """Fraction of each layer's active entries to drop (and regrow) at an update on ``step``."""
    span = end - begin
    if span <= 0:
        raise ValueError(f"end ({end}) must be greater than begin ({begin})")
    if schedule == "constant":
        return alpha
    if schedule == "cosine":
        t = min(max(step, 0), span)
        return alpha / 2.0 * (1.0 + math.cos(math.pi * t / span))
    if schedule == "linear":
        t = min(max(step - begin, 0), span)
        return alpha * (1.0 - t / span)
    raise ValueError(f"drop_fraction_schedule {schedule!r} is unknown; allowed: cosine, constant, linear")


def gmp_sparsity(step: int, final: float, initial: float, begin: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3, held outside [t0, t0 + n dt]."""
    span = end - begin
    if span <= 0:
        raise ValueError(f"end ({end}) must be greater than begin ({begin})")
    progress = min(max(step - begin, 0), span) / span
    return final + (initial - final) * (1.0 - progress) ** 3
