"""Per-layer sparsity from a global budget (uniform, Erdos-Renyi, ERK, global magnitude).

Pure functions of shapes (and, for ``"global"``, of weights) so every process computes the same
answer with no communication. ER/ERK follow rigl/sparse_utils.py: the budget is the uniform one
in integer counts, and layers whose density would exceed 1 are made dense, repeatedly.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch

from .topk import select_topk

DISTRIBUTION_METHODS = ("uniform", "er", "erk", "global")


def zeros_for(sparsity: float, numel: int) -> int:
    """Exactly floor(s * N) zeros: the spec's integer count for a layer of sparsity s."""
    return int(math.floor(sparsity * numel))


def _validate(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    method: str,
    dense: Iterable[str],
    custom: Mapping[str, float],
) -> None:
    if method not in DISTRIBUTION_METHODS:
        raise ValueError(f"distribution method {method!r} is unknown; allowed: {', '.join(DISTRIBUTION_METHODS)}")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    unknown = sorted(set(dense) - set(shapes))
    if unknown:
        raise ValueError(f"dense layers not among the sparsified layers: {unknown}")
    unknown = sorted(set(custom) - set(shapes))
    if unknown:
        raise ValueError(f"custom_sparsity names layers that are not among the sparsified layers: {unknown}")
    bad = {k: v for k, v in custom.items() if not (0.0 <= v < 1.0)}
    if bad:
        raise ValueError(f"custom sparsities must be in [0, 1): {bad}")
    both = sorted(set(dense) & set(custom))
    if both:
        raise ValueError(f"layers both dense and custom: {both}")
    for name, shape in shapes.items():
        if len(shape) < 2 or any(d <= 0 for d in shape):
            raise ValueError(f"layer {name!r}: shape {tuple(shape)} is not a weight matrix or kernel")


def free_budget(
    shapes: Mapping[str, Sequence[int]], sparsity: float, dense: Iterable[str], custom: Mapping[str, float]
) -> int:
    """Active entries the non-dense, non-custom layers share: the uniform budget minus what dense layers use
    beyond it (sum_free (N - floor(S N)) - sum_dense floor(S N))."""
    dense = set(dense)
    budget = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        if name in dense:
            budget -= zeros_for(sparsity, n)
        elif name not in custom:
            budget += n - zeros_for(sparsity, n)
    return budget


def _raw_score(shape: Sequence[int], method: str, power: float) -> float:
    if method == "er":
        return (shape[0] + shape[1]) / (shape[0] * shape[1])
    return (sum(shape) / math.prod(shape)) ** power


def layer_sparsities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    method: str = "erk",
    dense: Iterable[str] = (),
    custom: Optional[Mapping[str, float]] = None,
    erk_power_scale: float = 1.0,
    *,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, float]:
    """Sparsity of each layer so that the model as a whole meets ``sparsity``.

    ``dense`` layers are kept dense and count in the budget (ER/ERK/global shrink the others to pay
    for them, as the reference does); ``custom`` layers get a fixed sparsity outside the budget.
    ``"global"`` keeps the largest-magnitude entries across all free layers and needs ``weights``.
    """
    custom = dict(custom or {})
    dense = list(dense)
    _validate(shapes, sparsity, method, dense, custom)
    out: Dict[str, float] = {}
    for name in shapes:
        if name in dense:
            out[name] = 0.0
        elif name in custom:
            out[name] = float(custom[name])
    free = [n for n in shapes if n not in out]
    if not free:
        return out
    if method == "uniform":
        out.update({n: float(sparsity) for n in free})
        return {n: out[n] for n in shapes}
    if method == "global":
        return {**out, **_global_sparsities(shapes, free, sparsity, dense, custom, weights)}

    forced_dense: set = set()
    while True:
        budget = free_budget(shapes, sparsity, list(dense) + sorted(forced_dense), custom)
        active = [n for n in free if n not in forced_dense]
        if not active:
            # Only float rounding at sparsity 0 gets here (for S > 0 the last free layer has
            # eps * raw = budget / N <= 1): all dense is then exactly the budget.
            break
        raw = {n: _raw_score(shapes[n], method, erk_power_scale) for n in active}
        divisor = sum(raw[n] * math.prod(shapes[n]) for n in active)
        eps = budget / divisor
        if eps <= 0:
            raise ValueError(
                f"sparsity {sparsity} cannot be met: the dense layers use the whole parameter budget, "
                f"leaving nothing for {sorted(active)[:5]}"
            )
        max_raw = max(raw.values())
        if max_raw * eps > 1.0:
            # Every layer at the maximum score becomes dense; solve again (rigl/sparse_utils.py).
            forced_dense.update(n for n in active if raw[n] == max_raw)
            continue
        break
    for n in free:
        out[n] = 0.0 if n in forced_dense else max(0.0, 1.0 - eps * raw[n])
    return {n: out[n] for n in shapes}


def _global_sparsities(shapes, free, sparsity, dense, custom, weights) -> Dict[str, float]:
    if weights is None:
        raise ValueError("distribution 'global' needs the layers' weights (one magnitude threshold across layers)")
    missing = [n for n in free if n not in weights]
    if missing:
        raise ValueError(f"distribution 'global': weights missing for layers {missing}")
    budget = free_budget(shapes, sparsity, dense, custom)
    if budget <= 0:
        raise ValueError(f"sparsity {sparsity} cannot be met: the dense layers use the whole parameter budget")
    scores = [weights[n].detach().reshape(-1).abs() for n in free]
    kept = select_topk(scores, [0] * len(scores), torch.tensor([budget]))
    return {n: 1.0 - int(k.sum()) / math.prod(shapes[n]) for n, k in zip(free, kept)}
