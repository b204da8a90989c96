"""Exact per-pool top-k over sharded scores by radix select on the scores' bit patterns.

Each process holds a contiguous range of every layer's scores (any partition; empty ranges are
fine). Float scores map to int32 keys whose order is the float order, so the k-th largest score
of a pool is found digit by digit, most significant first: one all_reduce of a (pools x buckets)
histogram per digit, all layers and pools batched into it, and only entries that still share the
chosen prefix are looked at again. Entries equal to the threshold are taken in global position
order (layer order, then flat index), found with one all_gather of per-shard tie counts. The
result is bit-identical to ``topk.select_topk`` on the whole tensors, for any world size, and no
payload grows with the number of entries.

Memory: nothing entry-sized outlives one layer. Each pass computes a layer's keys, reads them and
lets them go, so scores, eligibility and per-entry pools may be handed over as zero-argument
callables (``Lazy``) that build one layer's tensor when asked, once per pass: the transient is then
about 6 bytes times the largest local layer (its int32 keys and a bool or two), not every layer's
scores at once. The price is computing each layer's scores again in each pass (at most five: three
digits, the ties, the marking), once every delta_t steps; the memory peak limits every run.

Entry-sized work stays on each layer's scores' device; the per-pool search state stays on the host;
histograms are summed on the first non-empty layer's device and handed to ``comm`` there (it moves
them to its backend's device and back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import bits
from ..shards import Collectives

PoolIds = Union[int, torch.Tensor]
#: A layer's tensor, or a zero-argument callable that builds it anew at each call; the selection
#: may overwrite what a callable returns, never a tensor handed over as such.
Lazy = Union[torch.Tensor, Callable[[], torch.Tensor]]

_INT32_MAX = 2**31 - 1
_INELIGIBLE = -(2**31)  # below every float's key (it is the key of a NaN, and NaN is refused)
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
#: Digit widths, most significant first. The first 12 bits are the sign, the exponent and three
#: mantissa bits, so one pass already narrows a pool to an eighth of a binade.
DEFAULT_DIGITS = (12, 10, 10)


def order_keys(scores: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """int32 keys ordered as the float scores: key(a) < key(b) iff a < b (-0.0 and +0.0 equal).

    Positive floats order as their bit patterns; negative ones reversed, which flipping the low 31
    bits does. bf16 and fp16 widen to fp32 exactly. ``overwrite``: contiguous fp32 ``scores`` that
    the caller is done with become the keys in place, instead of a second 4-byte tensor."""
    if scores.dtype not in _SUPPORTED:
        raise TypeError(f"selection scores must be float32, bfloat16 or float16, got {scores.dtype}")
    flat = scores.reshape(-1)
    if overwrite and flat.dtype == torch.float32 and flat.is_contiguous():
        keys = flat.add_(0.0).view(torch.int32)  # -0.0 + 0.0 is +0.0
    else:
        keys = (flat.float() + 0.0).view(torch.int32)  # a new tensor
    flip = keys >> 31  # arithmetic: -1 for negative floats, 0 otherwise
    flip &= _INT32_MAX
    keys ^= flip
    return keys


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
    scores: Sequence[Lazy],
    pools: Sequence[Union[PoolIds, Callable[[], torch.Tensor]]],
    k: torch.Tensor,
    eligible: Optional[Sequence[Lazy]],
    offsets: Sequence[int],
    layer_pools: Optional[Sequence[Sequence[int]]] = None,
    digits: Sequence[int] = DEFAULT_DIGITS,
    max_pool_size: Optional[int] = None,
    packed: bool = False,
) -> List[torch.Tensor]:
    """For each pool p, marks the k[p] eligible entries with the largest score, over all processes.

    ``scores[i]`` is this process's contiguous range of layer i, starting at global flat index
    ``offsets[i]``; every process passes the same layers in the same order (empty ranges for the
    layers it holds none of). Scores, eligibility and per-entry pools may each be given as a
    tensor or as a callable that builds it (``Lazy``). ``pools`` and ``k`` mean what they mean in
    ``topk.select_topk``; ``layer_pools[i]`` lists the pools of the whole layer i (needed where
    ``pools[i]`` is per entry: a process cannot see the pools of entries it does not hold).
    ``max_pool_size``, when known and below 2**31, halves the histogram payload (int32 counts).
    Returns one bool tensor per layer shaped as its scores, or with ``packed`` its ``bits.pack``
    (what a caller keeps of every layer is then an eighth of a byte an entry). Raises on every
    process alike when a score is NaN or a pool has fewer eligible entries than its k.
    """
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1).cpu()
    _check_layer_args(scores, pools, k, eligible, offsets)
    shifts = digit_shifts(digits)
    layers = _Layers(scores, pools, eligible, k.numel(), layer_pools, max_pool_size)
    search = _Search.start(k)

    # Pass 1: every entry's leading digit, all pools in one all_reduce.
    hist = comm.all_reduce_sum(_leading_digit_histogram(layers, shifts[0])).cpu().long()
    counts = _checked_pool_counts(hist, len(layers), k, comm.world_size)
    ids = search.open_ids()
    search.choose_digit(counts[ids], ids, shifts[0], first=True)

    # Passes 2..: the next digit of the entries that share an open pool's prefix.
    for prev_shift, shift in zip(shifts, shifts[1:]):
        ids = search.open_ids()
        if ids.numel() == 0:
            break
        width = 1 << (prev_shift - shift)
        hist = comm.all_reduce_sum(_next_digit_histogram(layers, search, ids, prev_shift, shift, width))
        search.choose_digit(hist.cpu().long().view(ids.numel(), width), ids, shift, first=False)

    # Everything above each pool's threshold, then its ties in (layer, global flat index) order.
    take = _tie_quotas(comm, layers, search.lo, search.need, offsets)
    return [_chosen(layers, i, search.lo, take, packed) for i in range(len(layers))]


class _Layers:
    """This process's range of every layer, built again by each pass that reads it."""

    def __init__(
        self,
        scores: Sequence[Lazy],
        pools: Sequence[Union[PoolIds, Callable[[], torch.Tensor]]],
        eligible: Optional[Sequence[Lazy]],
        n_pools: int,
        layer_pools: Optional[Sequence[Sequence[int]]],
        max_pool_size: Optional[int],
    ):
        self.scores, self.pools, self.eligible, self.n_pools = scores, pools, eligible, n_pools
        self.distinct = [
            _layer_pools(pools[i], None if layer_pools is None else layer_pools[i], i) for i in range(len(scores))
        ]
        self.count_dtype = torch.int32 if max_pool_size is not None and max_pool_size <= _INT32_MAX else torch.long
        # What the first pass learns, reading every layer: each layer's local shape and device.
        self.shapes: List[Optional[torch.Size]] = [None] * len(scores)
        self.devices: List[Optional[torch.device]] = [None] * len(scores)

    def __len__(self) -> int:
        return len(self.scores)

    def keys(self, i: int, nan_seen: Optional[List[bool]] = None) -> torch.Tensor:
        """Layer i's order keys, ineligible entries set to _INELIGIBLE (the key of a NaN, which is
        refused, so never a real score's): a new tensor the caller may overwrite. ``nan_seen``:
        a one-item list set to True when a score (eligible or not) is NaN."""
        lazy = self.scores[i]
        s = _get(lazy)
        if self.shapes[i] is None:
            self.shapes[i], self.devices[i] = s.shape, s.device
        if nan_seen is not None and s.numel() and bool(torch.isnan(s).any()):
            nan_seen[0] = True
        key = order_keys(s, overwrite=callable(lazy))
        del s
        if self.eligible is not None and key.numel():
            lazy_e = self.eligible[i]
            e = _get(lazy_e).reshape(-1).to(key.device)
            out = e.logical_not_() if callable(lazy_e) and e.dtype == torch.bool else ~e
            key.masked_fill_(out, _INELIGIBLE)
        return key

    def local_pools(self, i: int, device: torch.device) -> PoolIds:
        p = _get(self.pools[i])
        return p if isinstance(p, int) else p.reshape(-1).long().to(device)

    def home(self) -> torch.device:
        """Where histograms are summed: the first non-empty layer's device."""
        return next(
            (d for d, s in zip(self.devices, self.shapes) if s is not None and s.numel()),
            next((d for d in self.devices if d is not None), torch.device("cpu")),
        )


def _get(x):
    return x() if callable(x) else x


def _leading_digit_histogram(layers: _Layers, shift: int) -> torch.Tensor:
    """(pools x buckets) counts of the eligible entries' leading digit, then two slots that carry
    the NaN flag and the layer count, so that every process raises together instead of leaving
    the others waiting in a collective."""
    buckets = 1 << (32 - shift)
    half = buckets // 2
    n_slots = layers.n_pools * buckets
    nan_seen = [False]
    hist: Optional[torch.Tensor] = None
    for i in range(len(layers)):
        key = layers.keys(i, nan_seen)
        if not key.numel():
            continue
        if hist is None:  # on the first non-empty layer's device
            hist = torch.zeros(n_slots + 2, dtype=layers.count_dtype, device=key.device)
        p = layers.local_pools(i, key.device)
        out = (key == _INELIGIBLE) if layers.eligible is not None else None
        key >>= shift  # the leading digit, in place
        key += half
        if isinstance(p, int):
            hist[p * buckets : (p + 1) * buckets] += torch.bincount(key, minlength=buckets).to(hist.device)
            if out is not None:  # ineligible entries sit in bucket 0 of their pool: take them out
                hist[p * buckets] -= out.sum().to(hist.device)
        else:
            hist[:n_slots] += torch.bincount(p * buckets + key, minlength=n_slots).to(hist.device)
            if out is not None:
                hist[:n_slots:buckets] -= torch.bincount(p[out], minlength=layers.n_pools).to(hist.device)
        del key, out, p  # before the next layer's are built
    if hist is None:
        hist = torch.zeros(n_slots + 2, dtype=layers.count_dtype, device=layers.home())
    hist[-2] = int(nan_seen[0])
    hist[-1] = len(layers)
    return hist


def _next_digit_histogram(
    layers: _Layers, search: _Search, ids: torch.Tensor, prev_shift: int, shift: int, width: int
) -> torch.Tensor:
    """(open pools x width) counts of the digit below ``prev_shift`` of the entries that share
    their open pool's prefix, rows in ``ids`` order: the payload is per open pool, never per entry.
    A layer with no open pool is not read at all."""
    row_of = torch.full((layers.n_pools,), -1, dtype=torch.long)
    row_of[ids] = torch.arange(ids.numel())
    row_of_on = _OnDevices(row_of)
    prefix_on = _OnDevices(search.prefix.to(torch.int32))  # a prefix is a shifted int32 key
    hist = torch.zeros(ids.numel() * width, dtype=layers.count_dtype, device=layers.home())
    for i in range(len(layers)):
        if layers.shapes[i] is None or not layers.shapes[i].numel():
            continue
        if not any(bool(search.is_open[q]) for q in layers.distinct[i]):
            continue
        key = layers.keys(i)
        p = layers.local_pools(i, key.device)
        if isinstance(p, int):
            low = int(search.prefix[p]) << prev_shift  # the prefix's keys: [low, low + 2**prev_shift)
            hit = (key >= low).logical_and_(key <= low + (1 << prev_shift) - 1)
            digit = (key[hit] >> shift) & (width - 1)
            row = int(row_of[p])
            hist[row * width : (row + 1) * width] += torch.bincount(digit, minlength=width).to(hist.device)
        else:
            rows = row_of_on[key.device].index_select(0, p)
            hit = (key >> prev_shift) == prefix_on[key.device].index_select(0, p)
            hit &= rows >= 0
            digit = (key[hit] >> shift) & (width - 1)
            hist += torch.bincount(rows[hit] * width + digit, minlength=hist.numel()).to(hist.device)
        del key, p, hit, digit  # before the next layer's are built
    return hist


def _tie_quotas(
    comm: Collectives, layers: _Layers, lo: torch.Tensor, need: torch.Tensor, offsets: Sequence[int]
) -> Dict[Tuple[int, int], int]:
    """How many of its local ties at the threshold (key == lo - 1) each (layer, pool) takes: a
    pool's ``need`` ties go to those first in (layer order, global flat index) order. Every process
    learns every shard's tie count and offset (one all_gather of a row as long as the number of
    (layer, pool) pairs with ties, not of entries), so each can tell how many come before its own."""
    wanted = set((need > 0).nonzero().flatten().tolist())
    if not wanted:
        return {}
    slots = [(i, q) for i, distinct in enumerate(layers.distinct) for q in distinct if q in wanted]
    tie_layers = sorted({i for i, _ in slots})
    row = torch.zeros(len(slots) + len(tie_layers), dtype=torch.long)
    for j, (i, q) in enumerate(slots):
        if layers.shapes[i] is not None and layers.shapes[i].numel():
            row[j] = int(_ties(layers, i, q, int(lo[q])).sum())
    for j, i in enumerate(tie_layers):
        row[len(slots) + j] = offsets[i]
    table = comm.all_gather_rows(row)  # a host row: the collectives carry it on their device and back
    ties, offs = table[:, : len(slots)], table[:, len(slots) :]
    column = {i: j for j, i in enumerate(tie_layers)}
    me = comm.rank
    ranks = torch.arange(table.shape[0])
    before_pool = {q: 0 for q in wanted}  # the pool's ties in earlier layers
    take: Dict[Tuple[int, int], int] = {}
    for j, (i, q) in enumerate(slots):
        off = offs[:, column[i]]
        earlier = (off < off[me]) | ((off == off[me]) & (ranks < me))
        before = before_pool[q] + int(ties[earlier, j].sum())
        before_pool[q] += int(ties[:, j].sum())
        n = max(0, min(int(need[q]) - before, int(ties[me, j])))
        if n:
            take[(i, q)] = n
    return take


def _ties(layers: _Layers, i: int, q: int, lo_q: int, key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Layer i's local entries of pool q at its threshold: key == lo - 1 (eligible: the digit walk
    never stops on an ineligible key, whose bucket holds no count)."""
    key = layers.keys(i) if key is None else key
    tie = key == lo_q - 1
    p = layers.local_pools(i, key.device)
    if not isinstance(p, int):
        tie &= p == q
    return tie


def _first_true(mask: torch.Tensor, n: int, block: int = 1 << 16) -> torch.Tensor:
    """``mask`` with only its first ``n`` True entries left, in place: block counts find the block
    where the n-th lies, so no entry-sized index or running count is built."""
    whole = mask.numel() // block * block
    per_block = mask[:whole].view(-1, block).sum(1, dtype=torch.long).tolist()
    if whole < mask.numel():
        per_block.append(int(mask[whole:].sum()))
    seen = 0
    for b, c in enumerate(per_block):
        if seen + c >= n:
            part = mask[b * block : (b + 1) * block]
            part &= torch.cumsum(part, 0, dtype=torch.int32) <= n - seen
            mask[(b + 1) * block :] = False
            return mask
        seen += c
    return mask


def _chosen(layers: _Layers, i: int, lo: torch.Tensor, take: Dict[Tuple[int, int], int], packed: bool) -> torch.Tensor:
    """Layer i's result: every local entry at or above its pool's lower bound, ineligible entries
    out even where a bound reaches down to their key, then the ties this shard takes."""
    shape, device = layers.shapes[i], layers.devices[i]
    if not shape.numel():
        chosen = torch.zeros(0, dtype=torch.bool, device=device)
    else:
        key = layers.keys(i)
        p = layers.local_pools(i, key.device)
        chosen = torch.zeros(key.numel(), dtype=torch.bool, device=key.device)
        for q in layers.distinct[i]:
            if int(lo[q]) > _INT32_MAX:
                continue
            above = key >= int(lo[q])
            chosen |= above if isinstance(p, int) else above.logical_and_(p == q)
        if layers.eligible is not None and int(lo[layers.distinct[i]].min()) <= _INELIGIBLE:
            chosen &= key != _INELIGIBLE
        for q in layers.distinct[i]:
            n = take.get((i, q), 0)
            if n:
                chosen |= _first_true(_ties(layers, i, q, int(lo[q]), key), n)
    return bits.pack(chosen) if packed else chosen.view(shape)


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


class _OnDevices:
    """A small host tensor (per-pool search state), copied to each device that asks for it once."""

    def __init__(self, tensor: torch.Tensor):
        self._by_device = {tensor.device: tensor}

    def __getitem__(self, device: torch.device) -> torch.Tensor:
        t = self._by_device.get(device)
        if t is None:
            t = self._by_device[device] = next(iter(self._by_device.values())).to(device)
        return t


def _layer_pools(pools: PoolIds, layer_pools: Optional[Sequence[int]], i: int) -> List[int]:
    """Every pool the whole layer has entries in: the same list on every process."""
    if layer_pools is not None:
        return sorted(set(int(q) for q in layer_pools))
    if isinstance(pools, int):
        return [pools]
    raise ValueError(f"layer {i} has per-entry pool ids: pass layer_pools so every process knows the layer's pools")
