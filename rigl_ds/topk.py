"""Exact top-k per pool on whole tensors: the single-process reference for every selection.

A *pool* is the set of entries that compete for one k (a layer, one block of a split layer, or
all layers under the global distribution). Ties are broken by position: layer order first, then
flat index, lowest first. The sharded selection must reproduce this bit for bit.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


def _components(pools: Sequence[torch.Tensor]) -> List[List[int]]:
    """Groups layers that share a pool, so independent layers are sorted one at a time."""
    owner: Dict[int, int] = {}
    parent = list(range(len(pools)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, p in enumerate(pools):
        for pool in torch.unique(p).tolist() if p.numel() else []:
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
    pools: Sequence[torch.Tensor],
    k: torch.Tensor,
    eligible: Optional[Sequence[torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """For each pool p, marks the k[p] eligible entries with the largest score.

    ``scores[i]`` and ``pools[i]`` are layer i's flat scores and pool ids; the result is one bool
    tensor per layer. Raises if a score is NaN or a pool has fewer eligible entries than its k.
    """
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1)
    if (k < 0).any():
        raise ValueError(f"k must be non-negative, got {k.tolist()}")
    out: List[Optional[torch.Tensor]] = [None] * len(scores)
    for comp in _components(pools):
        s = torch.cat([scores[i].reshape(-1) for i in comp]) if comp else torch.empty(0)
        if torch.isnan(s).any():
            raise ValueError("selection scores contain NaN; refusing to choose a mask from them")
        p = torch.cat([pools[i].reshape(-1).long() for i in comp])
        if eligible is not None:
            e = torch.cat([eligible[i].reshape(-1) for i in comp])
            s = torch.where(e, s, torch.full_like(s, float("-inf")))
        else:
            e = torch.ones_like(p, dtype=torch.bool)
        n_eligible = torch.bincount(p, weights=e.to(torch.float64), minlength=k.numel()).long().cpu()
        short = (n_eligible < k) & (torch.bincount(p, minlength=k.numel()).cpu() > 0)
        if short.any():
            bad = short.nonzero().flatten().tolist()[:5]
            raise ValueError(
                f"pools {bad} have fewer eligible entries ({n_eligible[bad].tolist()}) than k ({k[bad].tolist()})"
            )
        # index_select/scatter_ rather than advanced indexing: several times faster on CPU.
        order = torch.argsort(s, descending=True, stable=True)
        p_sorted = p.index_select(0, order)
        if p.numel() and bool((p != p[0]).any()):
            by_pool = torch.argsort(p_sorted, stable=True)
            order, p_sorted = order.index_select(0, by_pool), p_sorted.index_select(0, by_pool)
        counts = torch.bincount(p_sorted, minlength=k.numel())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(p_sorted.numel(), device=p.device) - starts.index_select(0, p_sorted)
        k_dev = k.to(p.device)
        chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(0, order, rank < k_dev.index_select(0, p_sorted))
        for i, part in zip(comp, torch.split(chosen, [scores[i].numel() for i in comp])):
            out[i] = part.view(scores[i].shape)
    return out  # type: ignore[return-value]
