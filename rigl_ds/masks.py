"""Mask operations over shards: initialise, drop/grow, prune, and keep masked entries at zero.

Written once for any storage view: every count is reduced through ``Collectives`` and every
selection goes through its exact top-k, so a shard never needs another rank's entries.

Devices: a shard's mask lives on the shard's device, beside its fp32 master; a tensor elsewhere
(the low-precision copy on the accelerator while the master is offloaded to the host) is masked
with the mask copied to its own device (``Shard.mask_on``). Counts are summed on the first shard's
device and reduced through ``Collectives``, which carries them on its backend's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from . import bits, faults, keyed_random
from .shards import Collectives, Shard


@dataclass
class UpdateStats:
    """What one mask update changed, summed over all layers and ranks."""

    step: int
    drop_fraction: float
    dropped: int = 0  # active before, inactive after
    grown: int = 0  # inactive before, active after (weight and state start per grow_init / zero)
    regrown: int = 0  # chosen by drop, then grown again in the same update: keeps weight and state
    n_active: int = 0
    # What the update cost this process (filled in by the controller).
    collectives: int = 0
    bytes_sent: int = 0  # per rank, ring-algorithm estimate; 0 in a single process
    comm_seconds: float = 0.0
    seconds: float = 0.0


def pool_counts(shards: Sequence[Shard], comm: Collectives, n_pools: int) -> torch.Tensor:
    """Global active entries per pool (int64), one all_reduce for all layers."""
    local = torch.zeros(n_pools, dtype=torch.long, device=_home(shards))
    for s in shards:
        pools = s.pool_ids()
        if isinstance(pools, int):
            local[pools] += s.active_count().to(local.device)
        else:
            local += torch.bincount(pools[s.mask], minlength=n_pools).to(local.device)
    return comm.all_reduce_sum(local)


def _magnitude(s: Shard) -> Callable[[], torch.Tensor]:
    """|w| of a shard at full precision, built when the selection reads it (a new tensor)."""
    return lambda: s.precise_weight().detach().abs()


def _pools(shards: Sequence[Shard]) -> list:
    """Each shard's pool ids: an int, or a callable that builds the per-entry ids when read."""
    return [s.pool_ids() if len(set(s.layer.pools)) == 1 else s.pool_ids for s in shards]


def _home(shards: Sequence[Shard]) -> torch.device:
    """Where per-layer counts are summed before one collective: the first shard's device."""
    return shards[0].device if shards else torch.device("cpu")


class _MaskBeside:
    """A mask on every device that holds a tensor it masks, copied to each at most once. Given the
    shard that owns it, the copy comes from the shard's cached packed bits (``Shard.mask_on``)."""

    def __init__(self, mask: torch.Tensor, shard: Optional[Shard] = None):
        self._by_device = {mask.device: mask}
        self._shard = shard

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mask on ``tensor``'s device."""
        m = self._by_device.get(tensor.device)
        if m is None:
            if self._shard is not None:
                m = self._shard.mask_on(tensor.device)
            else:
                m = next(iter(self._by_device.values())).to(tensor.device)
            self._by_device[tensor.device] = m
        return m


def check_counts(shards: Sequence[Shard], comm: Collectives, n_pools: int, expected: torch.Tensor, what: str) -> None:
    """Fails loudly when any pool's active count drifted from ``expected``."""
    got = pool_counts(shards, comm, n_pools).cpu()
    expected = expected.cpu()
    if not torch.equal(got, expected):
        bad = (got != expected).nonzero().flatten().tolist()[:5]
        raise RuntimeError(
            f"{what}: active counts drifted in pools {bad}: expected {expected[bad].tolist()}, got {got[bad].tolist()}"
        )


def init_masks(
    shards: Sequence[Shard],
    comm: Collectives,
    n_pools: int,
    targets: torch.Tensor,
    seed: int,
    by_magnitude: bool,
    all_active: bool = False,
) -> None:
    """Exact counts per pool, placed by keyed random scores (a seeded random subset that any
    partition reproduces) or, for the global distribution, by initial weight magnitude.
    ``all_active``: every target is its pool's size (dense start, as GMP's), so no selection runs."""
    if all_active:
        for s in shards:
            s.mask = torch.ones(s.numel, dtype=torch.bool, device=s.device)
    else:
        if by_magnitude:
            scores = [_magnitude(s) for s in shards]
        else:
            scores = [
                lambda s=s: keyed_random.uniform_range(
                    keyed_random.derive_key(seed, "init", s.layer.name), s.offset, s.numel, s.device
                )
                for s in shards
            ]
        new = comm.select_topk(scores, _pools(shards), targets, None, shards, packed=True)
        for s, m in zip(shards, new):
            s.mask_bits = m.to(s.device)
    apply_masks(shards, with_optimizer_state=True)
    check_counts(shards, comm, n_pools, targets, "mask initialisation")


def keep_active(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero where ``mask`` is False, in place. torch.where(out=) is about twice as fast as
    masked_fill_ on CPU (no inverted mask), and unlike mul_ it turns a NaN at a masked entry into 0.
    A mask on another device than ``tensor`` is copied over first (``Shard.mask_on`` avoids that
    copy for repeated use)."""
    torch.where(mask.to(tensor.device), tensor, tensor.new_zeros(()), out=tensor)


def apply_masks(shards: Sequence[Shard], with_optimizer_state: bool = False) -> None:
    """Masked entries exactly zero in the weight (every copy) and, on request, the optimizer state."""
    for s in shards:
        if not s.dense_storage:
            continue  # packed storage holds no masked entries
        mask = _MaskBeside(s.mask, s)
        keep_active(s.weight, mask.of(s.weight))
        for copy in s.extra_copies():
            keep_active(copy, mask.of(copy))
        if with_optimizer_state:
            for state in s.optimizer_states():
                keep_active(state, mask.of(state))


def mask_gradients(shards: Sequence[Shard]) -> None:
    """Zero the gradients of masked entries before the step, so no momentum leaks into them. Runs
    on every step, so it is one pass over each gradient: each layer's mask is unpacked into one
    reused buffer per device (the largest layer's size in bytes) and applied as a bitwise AND
    (``_zero_masked_consuming``), not a fresh allocation and a ``torch.where`` per layer and step."""
    largest = max((bits.packed_numel(s.numel) * 8 for s in shards), default=0)
    for s in shards:
        g = s.grad() if s.dense_storage else None  # packed storage has no masked entries to zero
        if g is not None and g.numel() > 0:
            _zero_masked_consuming(g, s.mask_on(g.device, _scratch(g.device, largest)))


# Floating dtypes by the integer dtype of their width: AND with all-ones keeps an entry's bits, AND
# with zero gives +0.0 (a NaN or inf at a masked entry included), exactly what torch.where(mask, t, 0) gives.
_SAME_WIDTH_INT = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}


def _zero_masked_consuming(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """``keep_active(tensor, mask)`` that overwrites ``mask`` (a scratch the caller is done with):
    the mask becomes int8 0/-1 in place and is ANDed into the tensor's bits, which type promotion
    widens to the tensor's integer width. On CPU this is 2.5x faster than torch.where (0.75 against
    1.84 ns an entry for 19M fp32 entries, unpack included), bit for bit the same result."""
    as_int = _SAME_WIDTH_INT.get(tensor.dtype)
    if as_int is None or not tensor.is_contiguous() or mask.device != tensor.device:
        keep_active(tensor, mask)
        return
    ones = mask.view(torch.int8).neg_()  # True (1) -> -1: all bits set once widened
    bits_of = tensor.view(as_int)
    torch.bitwise_and(bits_of, ones, out=bits_of)


_SCRATCH: dict = {}


def _scratch(device: torch.device, numel: int) -> torch.Tensor:
    """A uint8 buffer of at least ``numel`` bytes on ``device``, kept between steps."""
    buffer = _SCRATCH.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[device] = torch.empty(numel, dtype=torch.uint8, device=device)
    return buffer


def gradients_finite(shards: Sequence[Shard], comm: Collectives) -> bool:
    """True when every rank's gradients of masked layers are finite (missing gradients count as finite)."""
    return not any_non_finite((s.grad() for s in shards), comm, _home(shards))


def any_non_finite(tensors: Iterable[Optional[torch.Tensor]], comm: Collectives, device: torch.device) -> bool:
    """Whether any rank holds a non-finite entry in any of ``tensors`` (None entries are skipped);
    one count reduced through ``comm``, summed on ``device``."""
    bad = torch.zeros(1, dtype=torch.long, device=device)
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            bad += 1
    return int(comm.all_reduce_sum(bad).item()) > 0


def _layer_std(shards: Sequence[Shard], comm: Collectives) -> List[float]:
    """Std of each whole layer (zeros included), as the reference's random_normal grow init uses."""
    stats = torch.zeros(len(shards), 3, dtype=torch.float64, device=_home(shards))
    for i, s in enumerate(shards):
        w = s.precise_weight().detach().double()
        stats[i] = torch.stack(
            [w.sum(), (w * w).sum(), torch.tensor(float(s.numel), dtype=torch.float64, device=w.device)]
        ).to(stats.device)
    stats = comm.all_reduce_sum(stats).cpu()
    mean = stats[:, 0] / stats[:, 2]
    var = (stats[:, 1] / stats[:, 2] - mean * mean).clamp_min(0)
    return var.sqrt().tolist()


def commit_masks(
    shards: Sequence[Shard],
    comm: Collectives,
    new_masks: Sequence[torch.Tensor],
    stats: UpdateStats,
    grow_init: str = "zeros",
    grow_key: Optional[Callable[[Shard], int]] = None,
    chosen_to_drop: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """Installs new masks. Entries inactive before and active now start at the grow-init value with
    zero optimizer state; entries that leave the mask become zero in weight and state; entries
    active before and after keep both, even if the drop step chose them first. ``new_masks`` and
    ``chosen_to_drop`` hold each layer's packed bits (``bits.pack``) or bool mask; each layer is
    unpacked and committed in turn, so the transient is one layer's."""
    stds = _layer_std(shards, comm) if grow_init == "random_normal" else None
    counts = torch.zeros(3, dtype=torch.long, device=_home(shards))
    for i, s in enumerate(shards):
        new = _as_mask(new_masks[i], s)
        old = s.mask
        grown = new & ~old
        dropped = old.logical_and_(~new)
        del old
        grow_values = None
        if stds is not None:
            key, std = grow_key(s), stds[i]
            grow_values = lambda index, key=key, std=std: keyed_random.normal(key, index) * std  # noqa: E731
        n_dropped, n_grown = dropped.sum(), grown.sum()
        s.install_mask(new, grown, dropped, grow_values)
        del grown, dropped
        if chosen_to_drop is None:
            regrown = new.new_zeros((), dtype=torch.long)
        else:
            regrown = _as_mask(chosen_to_drop[i], s).logical_and_(new).sum()
        del new
        counts += torch.stack([n_dropped, n_grown, regrown]).to(counts.device)
        if i == 0:
            faults.maybe_fail("mid-update", stats.step)  # one layer changed, the rest not yet
    counts = comm.all_reduce_sum(counts).tolist()
    stats.dropped, stats.grown, stats.regrown = counts


def _as_mask(m: torch.Tensor, s: Shard) -> torch.Tensor:
    """A layer's selection as a flat bool mask on the shard's device (a new tensor): packed bits
    are unpacked, a bool mask is copied."""
    if m.dtype == torch.uint8:
        return bits.unpack(m.to(s.device), s.numel)
    return m.reshape(-1).to(s.device, copy=True)


def select_drop_grow(
    shards: Sequence[Shard],
    comm: Collectives,
    n_pools: int,
    drop_fraction: float,
    grow_scores: Sequence[torch.Tensor],
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """What one update chooses, installed by nobody yet: the pools' active counts and, per layer, the
    packed bits of the entries it keeps and of those it grows (see ``drop_and_grow``). Pools are
    independent, so selecting a few layers at a time (one, inside backward) chooses what selecting
    them all together does; pools absent from ``shards`` count zero and choose nothing."""
    n_active = pool_counts(shards, comm, n_pools).cpu()
    k = torch.tensor([int(drop_fraction * n) for n in n_active.tolist()], dtype=torch.long)
    pools = _pools(shards)
    # Every layer's intermediate result is kept packed (1/8 byte an entry); scores, eligibility
    # and bool masks are built one layer at a time when the selection or the commit reads them.
    keep = comm.select_topk(
        [_magnitude(s) for s in shards], pools, n_active - k, [lambda s=s: s.mask for s in shards], shards, packed=True
    )

    def not_kept(i: int) -> Callable[[], torch.Tensor]:
        return lambda: bits.unpack(keep[i], shards[i].numel).logical_not_()

    grow = comm.select_topk(list(grow_scores), pools, k, [not_kept(i) for i in range(len(shards))], shards, packed=True)
    return n_active, keep, grow


def drop_and_grow(
    shards: Sequence[Shard],
    comm: Collectives,
    n_pools: int,
    step: int,
    drop_fraction: float,
    grow_scores: Optional[Sequence[torch.Tensor]],
    grow_init: str = "zeros",
    grow_key: Optional[Callable[[Shard], int]] = None,
    selected: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> UpdateStats:
    """One update (rigl/sparse_optimizers_base.py _get_update_op), per pool: k = int(f * n_active);
    keep the n_active - k active entries of largest |w| (inactive entries are never kept); grow the
    k entries of largest grow score among all entries not kept, the just-dropped ones included.
    ``selected``: each layer's (keep, grow) bits chosen already (in backward, layer by layer, by
    ``select_drop_grow`` at this step's drop fraction); ``grow_scores`` is then not read."""
    if selected is None:
        n_active, keep, grow = select_drop_grow(shards, comm, n_pools, drop_fraction, grow_scores)
    else:
        n_active = pool_counts(shards, comm, n_pools).cpu()
        keep, grow = [kp for kp, _ in selected], [g for _, g in selected]
    stats = UpdateStats(step=step, drop_fraction=drop_fraction, n_active=int(n_active.sum()))
    chosen_to_drop = [s.mask_bits & ~kp for s, kp in zip(shards, keep)]  # on the packed bits
    new_masks = [kp | g for kp, g in zip(keep, grow)]
    commit_masks(shards, comm, new_masks, stats, grow_init, grow_key, chosen_to_drop)
    check_counts(shards, comm, n_pools, n_active, f"mask update at step {step}")
    return stats


def prune_to(shards: Sequence[Shard], comm: Collectives, n_pools: int, step: int, targets: torch.Tensor) -> UpdateStats:
    """Magnitude pruning (GMP): keep the ``targets[p]`` active entries of largest |w| in each pool."""
    n_active = pool_counts(shards, comm, n_pools).cpu()
    targets = torch.minimum(targets, n_active)  # pruning never grows
    keep = comm.select_topk(
        [_magnitude(s) for s in shards],
        _pools(shards),
        targets,
        [lambda s=s: s.mask for s in shards],
        shards,
        packed=True,
    )
    stats = UpdateStats(step=step, drop_fraction=0.0, n_active=int(targets.sum()))
    commit_masks(shards, comm, keep, stats)
    check_counts(shards, comm, n_pools, targets, f"pruning at step {step}")
    return stats
