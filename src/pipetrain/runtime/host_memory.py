"""Host memory that stays mapped: glibc malloc told to keep what tensors free, for pipelines on the CPU.

PyTorch's CPU tensors come from malloc. glibc gives a large block its own fresh pages (mmap) or grows the
heap, and returns freed memory to the system (munmap, trim); the next tensor of that size then touches
fresh pages, and every first touch of a page is a page fault plus zeroing. Single-process training frees
each buffer before it needs the next and rarely pays this. A pipeline holds several microbatches'
activations, and a split backward holds each linear's (input, output gradient) from I until W, so the
buffers freed in between are handed back to the system and faulted in again: on a 4-block d256 GPT stage,
2,080 page faults (8 MiB) per I, which made I + W 3-9% slower than a fused B (0-2% once kept).

`keep_freed_memory()` sets malloc's mmap threshold to its largest value (32 MiB: blocks below it come from
the heap, which is reused) and its trim threshold out of reach (the heap is never given back), so a
process's resident memory stays at its peak instead of rising and falling every microbatch. A CPU `Stage`
calls it (once per process); set PIPETRAIN_KEEP_FREED_MEMORY=0 to leave malloc as it is. No-op (False) where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger("pipetrain")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest on 64-bit: blocks above it are still mmapped
NEVER_TRIM = 2**31 - 1  # (mallopt takes an int)

_kept: bool | None = None  # the answer, once asked in this process


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory mapped (see the module docstring). Returns whether it did;
    False without glibc, when PIPETRAIN_KEEP_FREED_MEMORY=0, or if mallopt refused. Idempotent."""
    global _kept
    if _kept is not None:
        return _kept
    _kept = False
    if os.environ.get("PIPETRAIN_KEEP_FREED_MEMORY", "1") == "0":
        logger.debug("PIPETRAIN_KEEP_FREED_MEMORY=0: malloc left as it is")
        return _kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _kept
    try:
        libc = ctypes.CDLL(None)
        _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    except (OSError, AttributeError):  # a glibc without mallopt in the process's namespace
        _kept = False
    logger.debug("glibc malloc keeps freed memory (mmap threshold 32 MiB, no trim): %s", _kept)
    return _kept
