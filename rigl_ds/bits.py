"""Boolean tensors stored at one bit per entry (the masks, compact optimizer state's positions).

A mask is read far less often than its weight is, and each read is one elementwise pass: unpacking
on use costs a transient ``numel``-byte bool tensor for one layer at a time, where a stored bool
mask costs a byte per entry of every layer for the whole run."""

from __future__ import annotations

from typing import Optional

import torch

_WEIGHTS: dict = {}


def _weights(device: torch.device) -> torch.Tensor:
    w = _WEIGHTS.get(device)
    if w is None:
        w = _WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return w


def packed_numel(numel: int) -> int:
    return (numel + 7) // 8


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ``ceil(numel / 8)`` uint8, entry ``i`` at bit ``i % 8`` of byte ``i // 8``."""
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        raise TypeError(f"pack takes a bool tensor, got {flat.dtype}")
    n = flat.numel()
    pad = packed_numel(n) * 8 - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack(bits: torch.Tensor, numel: int, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The 1-D bool tensor of ``numel`` entries that ``pack`` stored in ``bits``. ``scratch``: a
    uint8 tensor of at least ``8 * len(bits)`` bytes on ``bits``' device to unpack into (the result
    is a view of it, valid until its next use) instead of a new allocation: the per-step gradient
    masking unpacks every layer, and fresh allocations of that size cost page faults each time."""
    if bits.dtype != torch.uint8 or bits.numel() != packed_numel(numel):
        raise ValueError(f"{numel} entries need {packed_numel(numel)} uint8 bytes, got {bits.numel()} {bits.dtype}")
    if scratch is None:
        out = bits.unsqueeze(1).bitwise_and(_weights(bits.device))
    else:
        out = scratch.narrow(0, 0, bits.numel() * 8).view(-1, 8)
        torch.bitwise_and(bits.unsqueeze(1), _weights(bits.device), out=out)
    out = out.ne_(0).view(torch.bool).view(-1)  # 0/1 bytes in place: one transient byte per entry, not two
    return out if out.numel() == numel else out[:numel]


def count(bits: torch.Tensor) -> torch.Tensor:
    """Set bits (int64 scalar tensor) without unpacking: a per-byte popcount in uint8 arithmetic."""
    x = bits - ((bits >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return x.sum(dtype=torch.int64)


def count_before(bits: torch.Tensor, index: int) -> int:
    """Set bits among entries [0, index)."""
    whole, rest = divmod(index, 8)
    n = int(count(bits[:whole]))
    if rest:
        n += bin(int(bits[whole]) & ((1 << rest) - 1)).count("1")
    return n


def unpack_range(bits: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """Entries [start, start + numel) as a bool tensor, unpacking only the bytes they live in."""
    first, last = start // 8, (start + numel + 7) // 8
    part = bits[first:last]
    return unpack(part, part.numel() * 8)[start - first * 8 : start - first * 8 + numel]
