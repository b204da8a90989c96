"""Random numbers that are a pure function of (key, global index).

A rank holding entries [a, b) of a layer draws exactly the numbers the whole-tensor process
draws for [a, b): mask initialisation and SET growth then agree for every world size and
partition without communication. Counter-based hashing in int64 torch ops (no overflow: every
product stays below 2**63), vectorised on the tensor's device.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

_M32 = 0xFFFFFFFF


def derive_key(*parts: object) -> int:
    """A 64-bit key from readable parts (seed, stream, layer name, step), stable across processes."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash(key: int, index: torch.Tensor) -> torch.Tensor:
    index = index.long()
    k1, k2 = key & _M32, (key >> 32) & _M32
    h = _mix32((index & _M32) ^ k1)
    return _mix32(h ^ ((index >> 32) & _M32) ^ k2)


def uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1) on a 2**-24 grid, one per index."""
    return (_hash(key, index) >> 8).to(torch.float32) * (2.0**-24)


#: Entries hashed at a time by ``uniform_range``: the hash's int64 temporaries (several, 8 bytes an
#: entry each) then stay a few MiB instead of several times a whole layer's range.
RANGE_CHUNK = 1 << 20


def uniform_range(key: int, start: int, numel: int, device=None, chunk: int = RANGE_CHUNK) -> torch.Tensor:
    """``uniform(key, arange(start, start + numel))``, the same numbers, drawn ``chunk`` at a time
    into one float32 tensor: the transient is 4 bytes an entry, not the hash's int64 copies."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for a in range(0, numel, chunk):
        b = min(a + chunk, numel)
        out[a:b] = uniform(key, torch.arange(start + a, start + b, device=device))
    return out


def normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 per index (Box-Muller over two keyed uniforms)."""
    u1 = 1.0 - uniform(key, index)  # (0, 1]: log is finite
    u2 = uniform(key ^ 0x9E3779B97F4A7C15, index)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
