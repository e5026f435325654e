"""The C allocator's settings for loops that allocate the same large tensors every step (training).

glibc serves blocks above its mmap threshold (128 KiB at start) with fresh `mmap`s and returns them on free, so every
step's activations fault in zeroed pages again; it raises the threshold only after it frees such a block, which in a
training run first happens at the first evaluation (measured: steps ~25 % faster after it). Setting the thresholds
up front keeps freed blocks in the heap for the next step from the first step on. Elsewhere than glibc, nothing
changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX): larger blocks still mmap.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Keep up to this much freed memory at the top of the heap rather than trimming it back to the OS.
TRIM_THRESHOLD = 1024 * 1024 * 1024


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks up to 32 MiB instead of unmapping them (once per process); False where the C
    library is not glibc or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
