"""Reuse of freed frame-sized buffers (glibc malloc), so that a frame does not cost page faults.

glibc serves a large allocation (a 4 MiB frame from the 0MQ socket, msgpack, numpy, torch) with
a fresh ``mmap`` or gives the memory back (trim, ``MADV_DONTNEED``) when it is freed, so each
new buffer of the next frame starts as untouched pages: one fault and one zeroed 4 KiB page at a
time. On the 2-core build machine three fresh copies of an Eiger 1M frame (4.4 MB) cost 8.9 ms;
with the thresholds below, 0.66 ms (13x): the page faults, not the copies, were the cost
(``scatterflow bench`` profile, see benchmarks/RESULTS.md). Raising ``M_MMAP_THRESHOLD`` to its
maximum (32 MiB on 64-bit) and ``M_TRIM_THRESHOLD`` keeps freed buffers in the heap for the next
frame, and one arena (``M_ARENA_MAX``) keeps a buffer freed by one thread (a frame decoded on
the routing thread, received on another) for the next allocation of any thread: with per-thread
arenas, perf still counted a fault per page of every msgpack frame buffer. Memory held is the
peak in use, not more (mallopt(3); the same as the glibc tunables
``glibc.malloc.mmap_threshold`` and ``glibc.malloc.trim_threshold`` set before start).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1      # <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 * 2**20     # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 * 2**30


def reuse_environment() -> dict[str, str]:
    """The same settings as environment variables, for a process started from here that does
    not import this module (bluesky's 0MQ proxy): glibc reads them at start."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
            "MALLOC_ARENA_MAX": "1"}


def reuse_freed_buffers() -> bool:
    """Tell glibc malloc to keep freed large buffers for reuse; True if it took the settings.
    A no-op (False) where the C library is not glibc (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
          and mallopt(M_ARENA_MAX, 1) == 1)
    if not ok:
        log.debug("mallopt refused the buffer-reuse thresholds")
    return ok
