"""Exact per-pool top-k over sharded scores by radix select on the scores' bit patterns.

Each process holds a contiguous range of every layer's scores (any partition; empty ranges are
fine). Float scores map to int32 keys whose order is the float order, so the k-th largest score
of a pool is found digit by digit, most significant first: one all_reduce of a (pools x buckets)
histogram per digit, all layers and pools batched into it, and only entries that still share the
chosen prefix are looked at again. Entries equal to the threshold are taken in global position
order (layer order, then flat index), found with one all_gather of per-shard tie counts. The
result is bit-identical to ``topk.select_topk`` on the whole tensors, for any world size, and no
payload grows with the number of entries.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from ..shards import Collectives

PoolIds = Union[int, torch.Tensor]

_INT32_MAX = 2**31 - 1
_INELIGIBLE = -(2**31)  # below every float's key (it is the key of a NaN, and NaN is refused)
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
#: Digit widths, most significant first. The first 12 bits are the sign, the exponent and three
#: mantissa bits, so one pass already narrows a pool to an eighth of a binade.
DEFAULT_DIGITS = (12, 10, 10)


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float scores: key(a) < key(b) iff a < b (-0.0 and +0.0 equal).

    Positive floats order as their bit patterns; negative ones reversed, which flipping the low 31
    bits does. bf16 and fp16 widen to fp32 exactly."""
    if scores.dtype not in _SUPPORTED:
        raise TypeError(f"selection scores must be float32, bfloat16 or float16, got {scores.dtype}")
    bits = (scores.reshape(-1).float() + 0.0).view(torch.int32)  # a new tensor; -0.0 + 0.0 is +0.0
    flip = bits >> 31  # arithmetic: -1 for negative floats, 0 otherwise
    flip &= _INT32_MAX
    bits ^= flip
    return bits


def digit_shifts(digits: Sequence[int]) -> List[int]:
    """Right shifts that expose each digit's prefix: (12, 10, 10) -> [20, 10, 0]."""
    if sum(digits) != 32 or any(not 1 <= d <= 16 for d in digits):
        raise ValueError(f"digits must be widths of 1..16 bits summing to 32, got {tuple(digits)}")
    shifts, s = [], 32
    for d in digits:
        s -= d
        shifts.append(s)
    return shifts


def radix_select_topk(
    comm: Collectives,
    scores: Sequence[torch.Tensor],
    pools: Sequence[PoolIds],
    k: torch.Tensor,
    eligible: Optional[Sequence[torch.Tensor]],
    offsets: Sequence[int],
    layer_pools: Optional[Sequence[Sequence[int]]] = None,
    digits: Sequence[int] = DEFAULT_DIGITS,
    max_pool_size: Optional[int] = None,
) -> List[torch.Tensor]:
    """For each pool p, marks the k[p] eligible entries with the largest score, over all processes.

    ``scores[i]`` is this process's contiguous range of layer i, starting at global flat index
    ``offsets[i]``; every process passes the same layers in the same order (empty ranges for the
    layers it holds none of). ``pools`` and ``k`` mean what they mean in ``topk.select_topk``;
    ``layer_pools[i]`` lists the pools of the whole layer i (needed where ``pools[i]`` is a tensor:
    a process cannot see the pools of entries it does not hold). ``max_pool_size``, when known and
    below 2**31, halves the histogram payload (int32 counts). Raises on every process alike when a
    score is NaN or a pool has fewer eligible entries than its k.
    """
    n_layers = len(scores)
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1).cpu()
    n_pools = k.numel()
    if (k < 0).any():
        raise ValueError(f"k must be non-negative, got {k.tolist()}")
    if not (len(pools) == len(offsets) == n_layers) or (eligible is not None and len(eligible) != n_layers):
        raise ValueError("scores, pools, eligible and offsets must have one entry per layer")
    device = scores[0].device if n_layers else torch.device("cpu")
    shifts = digit_shifts(digits)
    count_dtype = torch.int32 if max_pool_size is not None and max_pool_size <= _INT32_MAX else torch.long
    distinct = [_layer_pools(pools[i], None if layer_pools is None else layer_pools[i], i) for i in range(n_layers)]
    local_pools = [p if isinstance(p, int) else p.reshape(-1).long() for p in pools]

    # Keys of this process's entries, ineligible ones set below every real key.
    keys: List[torch.Tensor] = []
    has_nan = False
    for i, s in enumerate(scores):
        key = order_keys(s)
        if key.numel():
            has_nan = has_nan or bool(torch.isnan(s).any())
            if eligible is not None:
                key.masked_fill_(~eligible[i].reshape(-1), _INELIGIBLE)
        keys.append(key)

    # Pass 1: the most significant digit of every entry; the last two slots carry the NaN flag and
    # the layer count, so every process raises together instead of leaving the others waiting.
    top_shift = shifts[0]
    buckets = 1 << (32 - top_shift)
    half = buckets // 2
    hist = torch.zeros(n_pools * buckets + 2, dtype=count_dtype, device=device)
    for i, key in enumerate(keys):
        if not key.numel():
            continue
        digit = key >> top_shift
        digit += half
        p = local_pools[i]
        if isinstance(p, int):
            hist[p * buckets : (p + 1) * buckets] += torch.bincount(digit, minlength=buckets)
        else:
            hist[: n_pools * buckets] += torch.bincount(p * buckets + digit, minlength=n_pools * buckets)
        if eligible is not None:  # ineligible entries sit in bucket 0 of their pool: take them out
            out = ~eligible[i].reshape(-1)
            if isinstance(p, int):
                hist[p * buckets] -= out.sum()
            else:
                hist[: n_pools * buckets : buckets] -= torch.bincount(p[out], minlength=n_pools)
    # Ineligible keys can still become candidates of a pool whose threshold is down among -inf;
    # they are harmless there: their key is below every real one, so no walk ever stops on it.
    hist[-2] = int(has_nan)
    hist[-1] = n_layers
    hist = comm.all_reduce_sum(hist).cpu().long()
    if int(hist[-2]):
        raise ValueError("selection scores contain NaN; refusing to choose a mask from them")
    if int(hist[-1]) != n_layers * comm.world_size:
        raise RuntimeError(
            f"processes passed different numbers of layers to the selection (this one {n_layers}); "
            "every process must pass every masked layer, with empty ranges for those it holds none of"
        )
    counts = hist[:-2].view(n_pools, buckets)
    n_eligible = counts.sum(1)
    short = (n_eligible < k).nonzero().flatten().tolist()
    if short:
        bad = short[:5]
        raise ValueError(
            f"pools {bad} have fewer eligible entries ({n_eligible[bad].tolist()}) than k ({k[bad].tolist()})"
        )

    # Per pool: every entry with key >= lo is in; of the entries with key == lo - 1 (ties at the
    # threshold) the first `need` in position order are in too. A pool stays open while its
    # k-th largest key shares its prefix with more entries than it still needs.
    lo = torch.full((n_pools,), _INT32_MAX + 1, dtype=torch.long)  # k = 0: nothing
    need = torch.zeros(n_pools, dtype=torch.long)
    prefix = torch.zeros(n_pools, dtype=torch.long)
    remaining = k.clone()
    open_ = k > 0

    def walk(rows: torch.Tensor, ids: torch.Tensor, shift: int, first: bool) -> None:
        """Chooses each open pool's next digit: the bucket that holds its remaining-th largest key."""
        r = remaining[ids]
        width = rows.shape[1]
        desc = rows.flip(1).cumsum(1)
        pos = (desc < r.unsqueeze(1)).sum(1)
        b = width - 1 - pos
        in_bucket = rows.gather(1, b.unsqueeze(1)).squeeze(1)
        r = r - (desc.gather(1, pos.unsqueeze(1)).squeeze(1) - in_bucket)
        new_prefix = b - width // 2 if first else prefix[ids] * width + b
        prefix[ids], remaining[ids] = new_prefix, r
        whole = in_bucket == r  # the bucket is taken entirely: no finer digit needed
        lo[ids] = torch.where(whole, new_prefix << shift, new_prefix + 1)
        need[ids] = torch.where(whole, torch.zeros_like(r), r)
        open_[ids] = ~whole & (shift > 0)

    ids = open_.nonzero().flatten()
    if ids.numel():
        walk(counts[ids], ids, top_shift, first=True)

    # Candidates: entries whose key shares an open pool's prefix (local index and key).
    cand_idx: List[Optional[torch.Tensor]] = [None] * n_layers
    cand_key: List[Optional[torch.Tensor]] = [None] * n_layers
    cand_pool: List[Optional[torch.Tensor]] = [None] * n_layers

    def narrow(
        i: int,
        source_key: torch.Tensor,
        source_idx: Optional[torch.Tensor],
        shift: int,
        pool_of: PoolIds,
        alive: torch.Tensor,
        prefix_dev: torch.Tensor,
    ) -> None:
        if isinstance(pool_of, int):
            if not bool(alive[pool_of]):
                cand_idx[i] = cand_key[i] = cand_pool[i] = None
                return
            hit = (source_key >> shift) == int(prefix[pool_of])
        else:
            hit = ((source_key >> shift).long() == prefix_dev[pool_of]) & alive.to(device)[pool_of]
        local = hit.nonzero().flatten()
        cand_idx[i] = local if source_idx is None else source_idx.index_select(0, local)
        cand_key[i] = source_key.index_select(0, local)
        cand_pool[i] = None if isinstance(pool_of, int) else pool_of.index_select(0, local)

    if bool(open_.any()):
        prefix_dev = prefix.to(device)
        for i, key in enumerate(keys):
            if key.numel() and any(bool(open_[q]) for q in distinct[i]):
                narrow(i, key, None, top_shift, local_pools[i], open_, prefix_dev)

    # Passes 2..: one digit at a time over the candidates of the open pools.
    for level in range(1, len(shifts)):
        ids = open_.nonzero().flatten()
        if ids.numel() == 0:
            break
        shift, width = shifts[level], 1 << (shifts[level - 1] - shifts[level])
        row_of = torch.full((n_pools,), -1, dtype=torch.long)
        row_of[ids] = torch.arange(ids.numel())
        row_of_dev = row_of.to(device)
        hist = torch.zeros(ids.numel() * width, dtype=count_dtype, device=device)
        for i in range(n_layers):
            if cand_key[i] is None or not cand_key[i].numel():
                continue
            digit = (cand_key[i] >> shift) & (width - 1)
            if cand_pool[i] is None:
                row = int(row_of[local_pools[i]])
                hist[row * width : (row + 1) * width] += torch.bincount(digit, minlength=width)
            else:
                hist += torch.bincount(row_of_dev[cand_pool[i]] * width + digit, minlength=hist.numel())
        hist = comm.all_reduce_sum(hist).cpu().long().view(ids.numel(), width)
        walk(hist, ids, shift, first=False)
        alive = open_ | (need > 0)  # candidates stay while open, or as the ties a pool must split
        prefix_dev = prefix.to(device)
        for i in range(n_layers):
            if cand_key[i] is not None and cand_key[i].numel():
                pool_of = local_pools[i] if cand_pool[i] is None else cand_pool[i]
                narrow(i, cand_key[i], cand_idx[i], shift, pool_of, alive, prefix_dev)

    # Every entry at or above its pool's lower bound.
    out: List[torch.Tensor] = []
    for i, key in enumerate(keys):
        chosen = torch.zeros(key.numel(), dtype=torch.bool, device=device)
        if key.numel():
            p = local_pools[i]
            for q in distinct[i]:
                if int(lo[q]) > _INT32_MAX:
                    continue
                above = key >= int(lo[q])
                chosen |= above if isinstance(p, int) else above & (p == q)
            if eligible is not None and int(lo[distinct[i]].min()) <= _INELIGIBLE:
                chosen &= eligible[i].reshape(-1)
        out.append(chosen)

    # Ties at the threshold: `need` of them per pool, in (layer order, global flat index) order.
    tie_pools = (need > 0).nonzero().flatten().tolist()
    if tie_pools:
        _take_ties(comm, out, cand_idx, cand_pool, distinct, offsets, tie_pools, need, device)
    return [o.view(s.shape) for o, s in zip(out, scores)]


def _layer_pools(pools: PoolIds, layer_pools: Optional[Sequence[int]], i: int) -> List[int]:
    """Every pool the whole layer has entries in: the same list on every process."""
    if layer_pools is not None:
        return sorted(set(int(q) for q in layer_pools))
    if isinstance(pools, int):
        return [pools]
    raise ValueError(f"layer {i} has per-entry pool ids: pass layer_pools so every process knows the layer's pools")


def _take_ties(comm, out, cand_idx, cand_pool, distinct, offsets, tie_pools, need, device) -> None:
    """Every process learns every shard's tie count and offset (one all_gather of a row as long as
    the number of (layer, pool) pairs with ties, not of entries), so each can tell how many ties
    come before its own in position order and take what is left of its pool's quota."""
    wanted = set(tie_pools)
    slots = [(i, q) for i in range(len(distinct)) for q in distinct[i] if q in wanted]
    tie_layers = sorted({i for i, _ in slots})
    row = torch.zeros(len(slots) + len(tie_layers), dtype=torch.long)
    local_ties: List[Optional[torch.Tensor]] = []
    for j, (i, q) in enumerate(slots):
        idx = cand_idx[i]
        if idx is not None and cand_pool[i] is not None:
            idx = idx[cand_pool[i] == q]
        local_ties.append(idx)
        row[j] = 0 if idx is None else idx.numel()
    for j, i in enumerate(tie_layers):
        row[len(slots) + j] = offsets[i]
    table = comm.all_gather_rows(row.to(device)).cpu()
    ties, offs = table[:, : len(slots)], table[:, len(slots) :]
    column = {i: j for j, i in enumerate(tie_layers)}
    me = comm.rank
    ranks = torch.arange(table.shape[0])
    before_pool = {q: 0 for q in wanted}  # the pool's ties in earlier layers
    for j, (i, q) in enumerate(slots):
        off = offs[:, column[i]]
        earlier = (off < off[me]) | ((off == off[me]) & (ranks < me))
        before = before_pool[q] + int(ties[earlier, j].sum())
        before_pool[q] += int(ties[:, j].sum())
        idx = local_ties[j]
        take = 0 if idx is None else max(0, min(int(need[q]) - before, idx.numel()))
        if take:
            out[i][idx[:take]] = True
