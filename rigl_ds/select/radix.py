"""Exact per-pool top-k over sharded scores by radix select on the scores' bit patterns.

Each process holds a contiguous range of every layer's scores (any partition; empty ranges are
fine). Float scores map to int32 keys whose order is the float order, so the k-th largest score
of a pool is found digit by digit, most significant first: one all_reduce of a (pools x buckets)
histogram per digit, all layers and pools batched into it, and only entries that still share the
chosen prefix are looked at again. Entries equal to the threshold are taken in global position
order (layer order, then flat index), found with one all_gather of per-shard tie counts. The
result is bit-identical to ``topk.select_topk`` on the whole tensors, for any world size, and no
payload grows with the number of entries.

Entry-sized work stays on each layer's scores' device; the per-pool search state stays on the host;
histograms are summed on the first non-empty layer's device and handed to ``comm`` there (it moves
them to its backend's device and back).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1).cpu()
    _check_layer_args(scores, pools, k, eligible, offsets)
    shifts = digit_shifts(digits)
    layers = _local_layers(scores, pools, k.numel(), eligible, layer_pools, max_pool_size)
    search = _Search.start(k)

    # Pass 1: every entry's leading digit, all pools in one all_reduce.
    hist = comm.all_reduce_sum(_leading_digit_histogram(layers, shifts[0])).cpu().long()
    counts = _checked_pool_counts(hist, len(layers.keys), k, comm.world_size)
    ids = search.open_ids()
    search.choose_digit(counts[ids], ids, shifts[0], first=True)
    cands = _narrow_candidates(layers, _whole_layers(layers, search), search, shifts[0])

    # Passes 2..: the next digit of the candidates, only for the pools still open.
    for prev_shift, shift in zip(shifts, shifts[1:]):
        ids = search.open_ids()
        if ids.numel() == 0:
            break
        width = 1 << (prev_shift - shift)
        hist = comm.all_reduce_sum(_next_digit_histogram(layers, cands, ids, shift, width))
        search.choose_digit(hist.cpu().long().view(ids.numel(), width), ids, shift, first=False)
        cands = _narrow_candidates(layers, cands, search, shift)

    # Everything above each pool's threshold, then its ties in (layer, global flat index) order.
    out = _mark_above_threshold(layers, search.lo)
    _take_ties(comm, out, cands, layers, offsets, search.need)
    return [o.view(s.shape) for o, s in zip(out, scores)]


@dataclass
class _Layers:
    """This process's range of every layer, in the form every pass reads."""

    keys: List[torch.Tensor]  # order keys, ineligible entries set to _INELIGIBLE
    pools: List[PoolIds]  # the local entries' pools: one int, or one long per entry (on the key's device)
    distinct: List[List[int]]  # every pool of the whole layer: the same on every process
    eligible: Optional[List[torch.Tensor]]  # flat, on the key's device
    n_pools: int
    has_nan: bool
    device: torch.device  # where histograms are summed: the first non-empty layer's
    count_dtype: torch.dtype


@dataclass
class _Search:
    """Per pool, what the digits chosen so far settle: every entry with key >= lo is in; of the
    entries with key == lo - 1 (ties at the threshold) the first ``need`` in position order are in
    too. A pool stays open while its k-th largest key shares its prefix with more entries than it
    still needs."""

    lo: torch.Tensor
    need: torch.Tensor
    prefix: torch.Tensor  # the digits chosen so far, as a signed number
    remaining: torch.Tensor  # the rank of the k-th largest key among the entries sharing prefix
    is_open: torch.Tensor

    @classmethod
    def start(cls, k: torch.Tensor) -> "_Search":
        n_pools = k.numel()
        return cls(
            lo=torch.full((n_pools,), _INT32_MAX + 1, dtype=torch.long),  # k = 0: nothing
            need=torch.zeros(n_pools, dtype=torch.long),
            prefix=torch.zeros(n_pools, dtype=torch.long),
            remaining=k.clone(),
            is_open=k > 0,
        )

    def open_ids(self) -> torch.Tensor:
        return self.is_open.nonzero().flatten()

    def alive(self) -> torch.Tensor:
        """Pools whose candidates are still needed: open ones, and closed ones with ties to split."""
        return self.is_open | (self.need > 0)

    def choose_digit(self, rows: torch.Tensor, ids: torch.Tensor, shift: int, first: bool) -> None:
        """Given the reduced histogram ``rows`` of the pools ``ids`` (one row each, buckets in
        ascending key order), appends to each prefix the bucket that holds its remaining-th largest
        key, and closes the pools that bucket settles."""
        if ids.numel() == 0:
            return
        r = self.remaining[ids]
        width = rows.shape[1]
        desc = rows.flip(1).cumsum(1)
        pos = (desc < r.unsqueeze(1)).sum(1)
        b = width - 1 - pos
        in_bucket = rows.gather(1, b.unsqueeze(1)).squeeze(1)
        r = r - (desc.gather(1, pos.unsqueeze(1)).squeeze(1) - in_bucket)
        # The leading digit carries the sign: its buckets start at the most negative key.
        new_prefix = b - width // 2 if first else self.prefix[ids] * width + b
        self.prefix[ids], self.remaining[ids] = new_prefix, r
        whole = in_bucket == r  # the bucket is taken entirely: no finer digit needed
        self.lo[ids] = torch.where(whole, new_prefix << shift, new_prefix + 1)
        self.need[ids] = torch.where(whole, torch.zeros_like(r), r)
        self.is_open[ids] = ~whole & (shift > 0)


@dataclass
class _Candidates:
    """One layer's local entries whose key still shares an alive pool's prefix."""

    idx: Optional[torch.Tensor]  # local flat index; None: every entry, in order
    key: torch.Tensor
    pool: Optional[torch.Tensor]  # per entry; None where the layer's local pool is one int


def _check_layer_args(
    scores: Sequence[torch.Tensor],
    pools: Sequence[PoolIds],
    k: torch.Tensor,
    eligible: Optional[Sequence[torch.Tensor]],
    offsets: Sequence[int],
) -> None:
    if (k < 0).any():
        raise ValueError(f"k must be non-negative, got {k.tolist()}")
    if not (len(pools) == len(offsets) == len(scores)) or (eligible is not None and len(eligible) != len(scores)):
        raise ValueError("scores, pools, eligible and offsets must have one entry per layer")


def _local_layers(
    scores: Sequence[torch.Tensor],
    pools: Sequence[PoolIds],
    n_pools: int,
    eligible: Optional[Sequence[torch.Tensor]],
    layer_pools: Optional[Sequence[Sequence[int]]],
    max_pool_size: Optional[int],
) -> _Layers:
    """Keys and pools of this process's entries; raises before any collective on bad input."""
    device = next((s.device for s in scores if s.numel()), scores[0].device if len(scores) else torch.device("cpu"))
    count_dtype = torch.int32 if max_pool_size is not None and max_pool_size <= _INT32_MAX else torch.long
    distinct = [_layer_pools(pools[i], None if layer_pools is None else layer_pools[i], i) for i in range(len(scores))]
    local_pools = [p if isinstance(p, int) else p.reshape(-1).long().to(s.device) for p, s in zip(pools, scores)]
    flat_eligible = None if eligible is None else [e.reshape(-1).to(s.device) for e, s in zip(eligible, scores)]
    keys: List[torch.Tensor] = []
    has_nan = False
    for i, s in enumerate(scores):
        key = order_keys(s)
        if key.numel():
            has_nan = has_nan or bool(torch.isnan(s).any())
            if flat_eligible is not None:
                key.masked_fill_(~flat_eligible[i], _INELIGIBLE)
        keys.append(key)
    return _Layers(keys, local_pools, distinct, flat_eligible, n_pools, has_nan, device, count_dtype)


def _leading_digit_histogram(layers: _Layers, shift: int) -> torch.Tensor:
    """(pools x buckets) counts of the eligible entries' leading digit, then two slots that carry
    the NaN flag and the layer count, so that every process raises together instead of leaving
    the others waiting in a collective."""
    buckets = 1 << (32 - shift)
    half = buckets // 2
    n_slots = layers.n_pools * buckets
    hist = torch.zeros(n_slots + 2, dtype=layers.count_dtype, device=layers.device)
    for i, (key, p) in enumerate(zip(layers.keys, layers.pools)):
        if not key.numel():
            continue
        digit = key >> shift
        digit += half
        if isinstance(p, int):
            hist[p * buckets : (p + 1) * buckets] += torch.bincount(digit, minlength=buckets).to(hist.device)
        else:
            hist[:n_slots] += torch.bincount(p * buckets + digit, minlength=n_slots).to(hist.device)
        if layers.eligible is not None:  # ineligible entries sit in bucket 0 of their pool: take them out
            out = ~layers.eligible[i]
            if isinstance(p, int):
                hist[p * buckets] -= out.sum().to(hist.device)
            else:
                hist[:n_slots:buckets] -= torch.bincount(p[out], minlength=layers.n_pools).to(hist.device)
    hist[-2] = int(layers.has_nan)
    hist[-1] = len(layers.keys)
    return hist


def _checked_pool_counts(hist: torch.Tensor, n_layers: int, k: torch.Tensor, world_size: int) -> torch.Tensor:
    """The reduced leading histogram as (pools x buckets), once every process has checked the same
    sums: no NaN anywhere, every process passed every layer, every pool can fill its k."""
    if int(hist[-2]):
        raise ValueError("selection scores contain NaN; refusing to choose a mask from them")
    if int(hist[-1]) != n_layers * world_size:
        raise RuntimeError(
            f"processes passed different numbers of layers to the selection (this one {n_layers}); "
            "every process must pass every masked layer, with empty ranges for those it holds none of"
        )
    counts = hist[:-2].view(k.numel(), -1)
    n_eligible = counts.sum(1)
    short = (n_eligible < k).nonzero().flatten().tolist()
    if short:
        bad = short[:5]
        raise ValueError(
            f"pools {bad} have fewer eligible entries ({n_eligible[bad].tolist()}) than k ({k[bad].tolist()})"
        )
    return counts


def _whole_layers(layers: _Layers, search: _Search) -> List[Optional[_Candidates]]:
    """Every local entry of the layers that have an alive pool: what the leading digit narrows."""
    alive = search.alive()
    return [
        _Candidates(None, key, None if isinstance(p, int) else p)
        if key.numel() and any(bool(alive[q]) for q in distinct)
        else None
        for key, p, distinct in zip(layers.keys, layers.pools, layers.distinct)
    ]


def _narrow_candidates(
    layers: _Layers, cands: List[Optional[_Candidates]], search: _Search, shift: int
) -> List[Optional[_Candidates]]:
    """Keeps the candidates whose key >> shift equals their alive pool's prefix. Ineligible keys can
    stay as candidates of a pool whose threshold is down among -inf; they are harmless there: their
    key is below every real one, so no digit walk ever stops on it."""
    alive = search.alive()
    alive_on, prefix_on = _OnDevices(alive), _OnDevices(search.prefix)
    narrowed: List[Optional[_Candidates]] = []
    for c, layer_pool in zip(cands, layers.pools):
        if c is None or not c.key.numel():
            narrowed.append(c)
            continue
        if c.pool is None:
            if not bool(alive[layer_pool]):
                narrowed.append(None)
                continue
            hit = (c.key >> shift) == int(search.prefix[layer_pool])
        else:
            hit = ((c.key >> shift).long() == prefix_on[c.pool.device][c.pool]) & alive_on[c.pool.device][c.pool]
        local = hit.nonzero().flatten()
        idx = local if c.idx is None else c.idx.index_select(0, local)
        pool = None if c.pool is None else c.pool.index_select(0, local)
        narrowed.append(_Candidates(idx, c.key.index_select(0, local), pool))
    return narrowed


def _next_digit_histogram(
    layers: _Layers, cands: List[Optional[_Candidates]], ids: torch.Tensor, shift: int, width: int
) -> torch.Tensor:
    """(open pools x width) counts of the candidates' digit below ``shift``'s prefix, rows in
    ``ids`` order: the payload is per open pool, never per entry."""
    row_of = torch.full((layers.n_pools,), -1, dtype=torch.long)
    row_of[ids] = torch.arange(ids.numel())
    row_of_on = _OnDevices(row_of)
    hist = torch.zeros(ids.numel() * width, dtype=layers.count_dtype, device=layers.device)
    for c, layer_pool in zip(cands, layers.pools):
        if c is None or not c.key.numel():
            continue
        digit = (c.key >> shift) & (width - 1)
        if c.pool is None:
            row = int(row_of[layer_pool])
            hist[row * width : (row + 1) * width] += torch.bincount(digit, minlength=width).to(hist.device)
        else:
            rows = row_of_on[c.pool.device][c.pool]
            hist += torch.bincount(rows * width + digit, minlength=hist.numel()).to(hist.device)
    return hist


class _OnDevices:
    """A small host tensor (per-pool search state), copied to each device that asks for it once."""

    def __init__(self, tensor: torch.Tensor):
        self._by_device = {tensor.device: tensor}

    def __getitem__(self, device: torch.device) -> torch.Tensor:
        t = self._by_device.get(device)
        if t is None:
            t = self._by_device[device] = next(iter(self._by_device.values())).to(device)
        return t


def _mark_above_threshold(layers: _Layers, lo: torch.Tensor) -> List[torch.Tensor]:
    """Every local entry at or above its pool's lower bound; ineligible entries stay out even where
    a bound reaches down to their key."""
    out: List[torch.Tensor] = []
    for i, (key, p, distinct) in enumerate(zip(layers.keys, layers.pools, layers.distinct)):
        chosen = torch.zeros(key.numel(), dtype=torch.bool, device=key.device)
        if key.numel():
            for q in distinct:
                if int(lo[q]) > _INT32_MAX:
                    continue
                above = key >= int(lo[q])
                chosen |= above if isinstance(p, int) else above & (p == q)
            if layers.eligible is not None and int(lo[distinct].min()) <= _INELIGIBLE:
                chosen &= layers.eligible[i]
        out.append(chosen)
    return out


def _layer_pools(pools: PoolIds, layer_pools: Optional[Sequence[int]], i: int) -> List[int]:
    """Every pool the whole layer has entries in: the same list on every process."""
    if layer_pools is not None:
        return sorted(set(int(q) for q in layer_pools))
    if isinstance(pools, int):
        return [pools]
    raise ValueError(f"layer {i} has per-entry pool ids: pass layer_pools so every process knows the layer's pools")


def _take_ties(
    comm: Collectives,
    out: List[torch.Tensor],
    cands: List[Optional[_Candidates]],
    layers: _Layers,
    offsets: Sequence[int],
    need: torch.Tensor,
) -> None:
    """Marks in ``out`` the ``need[q]`` ties of each pool q that come first in (layer order, global
    flat index) order. Every process learns every shard's tie count and offset (one all_gather of a
    row as long as the number of (layer, pool) pairs with ties, not of entries), so each can tell
    how many ties come before its own and take what is left of its pool's quota."""
    wanted = set((need > 0).nonzero().flatten().tolist())
    if not wanted:
        return
    slots = [(i, q) for i, distinct in enumerate(layers.distinct) for q in distinct if q in wanted]
    tie_layers = sorted({i for i, _ in slots})
    row = torch.zeros(len(slots) + len(tie_layers), dtype=torch.long)
    local_ties: List[Optional[torch.Tensor]] = []
    for j, (i, q) in enumerate(slots):
        c = cands[i]
        idx = None if c is None else c.idx
        if c is not None and c.pool is not None:
            idx = idx[c.pool == q]
        local_ties.append(idx)
        row[j] = 0 if idx is None else idx.numel()
    for j, i in enumerate(tie_layers):
        row[len(slots) + j] = offsets[i]
    table = comm.all_gather_rows(row)  # a host row: the collectives carry it on their device and back
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
