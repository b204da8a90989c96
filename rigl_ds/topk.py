"""Exact top-k per pool on whole tensors: the single-process reference for every selection.

A *pool* is the set of entries that compete for one k (a layer, one block of a split layer, or
all layers under the global distribution). Ties are broken by position: layer order first, then
flat index, lowest first. The sharded selection must reproduce this bit for bit.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

PoolIds = Union[int, torch.Tensor]


def _pool_set(pools: PoolIds) -> List[int]:
    if isinstance(pools, int):
        return [pools]
    return torch.unique(pools).tolist() if pools.numel() else []


def _components(pools: Sequence[PoolIds]) -> List[List[int]]:
    """Groups layers that share a pool, so independent layers are selected one at a time."""
    owner: Dict[int, int] = {}
    parent = list(range(len(pools)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, p in enumerate(pools):
        for pool in _pool_set(p):
            if pool in owner:
                parent[find(i)] = find(owner[pool])
            else:
                owner[pool] = i
    groups: Dict[int, List[int]] = {}
    for i in range(len(pools)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def select_topk(
    scores: Sequence[torch.Tensor],
    pools: Sequence[PoolIds],
    k: torch.Tensor,
    eligible: Optional[Sequence[torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """For each pool p, marks the k[p] eligible entries with the largest score.

    ``scores[i]`` is layer i's flat scores; ``pools[i]`` its pool id (an int when the whole layer
    is one pool, else one id per entry). Returns one bool tensor per layer, on that layer's scores'
    device (pools and eligibility may come on another). Raises if a score is NaN or a pool has
    fewer eligible entries than its k.
    """
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1).cpu()
    if (k < 0).any():
        raise ValueError(f"k must be non-negative, got {k.tolist()}")
    out: List[Optional[torch.Tensor]] = [None] * len(scores)
    for comp in _components(pools):
        device = scores[comp[0]].device  # layers sharing a pool are selected together, on one device
        s = torch.cat([scores[i].reshape(-1).to(device) for i in comp])
        if torch.isnan(s).any():
            raise ValueError("selection scores contain NaN; refusing to choose a mask from them")
        if eligible is not None:
            e = torch.cat([eligible[i].reshape(-1).to(device) for i in comp])
            s = torch.where(e, s, torch.full_like(s, float("-inf")))
        else:
            e = torch.ones_like(s, dtype=torch.bool)
        in_pools = sorted({q for i in comp for q in _pool_set(pools[i])})
        if len(in_pools) == 1:
            n_eligible = torch.zeros(k.numel(), dtype=torch.long)
            n_eligible[in_pools[0]] = int(e.sum())
        else:
            p = torch.cat(
                [
                    torch.full((scores[i].numel(),), pools[i], dtype=torch.long, device=device)
                    if isinstance(pools[i], int)
                    else pools[i].reshape(-1).long().to(device)
                    for i in comp
                ]
            )
            n_eligible = torch.bincount(p, weights=e.to(torch.float64), minlength=k.numel()).long().cpu()
        short = [q for q in in_pools if int(n_eligible[q]) < int(k[q])]
        if short:
            bad = short[:5]
            raise ValueError(
                f"pools {bad} have fewer eligible entries ({n_eligible[bad].tolist()}) than k ({k[bad].tolist()})"
            )
        if len(in_pools) == 1:
            chosen = _select_one_pool(s, e, int(k[in_pools[0]]))
        else:
            # Ineligible entries go to an extra pool with k = 0, so an eligible score of -inf
            # never loses its place to them.
            chosen = _select_by_sort(s, torch.where(e, p, k.numel()), torch.cat([k, k.new_zeros(1)]))
        for i, part in zip(comp, torch.split(chosen, [scores[i].numel() for i in comp])):
            out[i] = part.view(scores[i].shape).to(scores[i].device)
    return out  # type: ignore[return-value]


def _select_one_pool(s: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """O(n): the k-th largest value is the threshold; entries above it are in, and ties at it are
    taken in position order until k. Same result as the stable sort, several times faster."""
    if k == 0:
        return torch.zeros_like(eligible)
    if k == int(eligible.sum()):
        return eligible.clone()
    if s.dtype in (torch.bfloat16, torch.float16):
        s = s.float()  # exact; kthvalue on half types is slower or missing on some devices
    threshold = torch.kthvalue(s, s.numel() - k + 1).values
    above = s > threshold
    ties = (s == threshold) & eligible
    need = k - int(above.sum())
    return above | (ties & (torch.cumsum(ties, 0, dtype=torch.long) <= need))


def _select_by_sort(s: torch.Tensor, p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Several pools at once: stable sort by score, then by pool; rank within pool < k[pool]."""
    # index_select/scatter_ rather than advanced indexing: several times faster on CPU.
    order = torch.argsort(s, descending=True, stable=True)
    p_sorted = p.index_select(0, order)
    by_pool = torch.argsort(p_sorted, stable=True)
    order, p_sorted = order.index_select(0, by_pool), p_sorted.index_select(0, by_pool)
    counts = torch.bincount(p_sorted, minlength=k.numel())
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(p_sorted.numel(), device=p.device) - starts.index_select(0, p_sorted)
    k_dev = k.to(p.device)
    return torch.zeros_like(p, dtype=torch.bool).scatter_(0, order, rank < k_dev.index_select(0, p_sorted))
