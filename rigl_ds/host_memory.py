"""Host (CPU) memory: glibc keeps freed heap blocks resident, so a phase that allocates and frees
many large transients (ZeRO-3 gathering each module whole while a model is built, or packed storage
taking each layer's active values) leaves a rank's resident memory far above what it holds."""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _threshold_after() -> int:
    """The mmap threshold to leave behind: the environment's, where it sets one, else 32 MiB."""
    try:
        return int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    except (KeyError, ValueError):
        return 32 << 20


@contextmanager
def freed_buffers_return_to_the_os(enabled: bool) -> Iterator[None]:
    """On CPU ranks, has glibc serve allocations of 1 MiB and more by mmap for the phase (a model
    built under ZeRO-3, a model packed). ZeRO-3 gathers each module's weights whole and frees them
    again (transformers' initialisation);
    with glibc's adaptive threshold those freed buffers stayed in the heap, and a rank's resident
    memory grew past the whole model's (measured on 2 ranks, a GPT-2 of 210M parameters, 801 MiB
    fp32: peak growth 1287 MiB on rank 1; with this, 492 MiB on each; the whole build, 838 MiB).
    Afterwards the threshold is glibc's adaptive ceiling, 32 MiB, or what ``MALLOC_MMAP_THRESHOLD_``
    in the environment set for the whole process (a CPU run that wants freed buffers returned
    throughout, at the cost of an mmap per large allocation).
    A no-op off glibc, and on accelerators (their weights are not on the host heap)."""
    libc = None
    if enabled:
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            pass
    if libc is not None and not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        libc = None  # not glibc
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _threshold_after())
            libc.malloc_trim(0)
