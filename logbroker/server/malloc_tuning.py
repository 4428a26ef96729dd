"""Keep a broker's resident memory close to what it holds, not to the largest burst it once took in.

A broker allocates many short-lived buffers of up to a megabyte or more: produce requests, Raft appends,
fetch answers. glibc's malloc serves a large allocation with its own mmap and unmaps it on free, but only
until the first such free: from then on it raises its "mmap threshold" to the freed size (up to 32 MiB)
and serves later large buffers from its heap arenas, one arena per thread that allocates. Freed heap
memory is returned to the system only from the top of an arena, so after a burst of 1 MB batches each
arena keeps tens of megabytes that the broker no longer uses. Measured with 16 partitions taking 1 MB
batches at RF3: peak broker RSS 189-293 MiB with the sliding threshold, 182-216 MiB with it fixed.

Fixing the threshold costs an mmap, an munmap and fresh pages per large buffer: a few tens of
microseconds per megabyte, small beside the megabyte's own copy into the log and over the network.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# Buffers of this size and larger get pages of their own, returned to the system when freed: glibc's
# own starting threshold, which its sliding adjustment would otherwise raise after the first free.
LARGE_BUFFER_MMAP_THRESHOLD_BYTES = 128 << 10
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def fix_mmap_threshold(threshold_bytes: int = LARGE_BUFFER_MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes``; False where the C library has no mallopt (musl,
    macOS), which leaves allocation as it was."""
    assert 0 < threshold_bytes <= 32 << 20, threshold_bytes  # glibc refuses more than HEAP_MAX/2 on 64-bit
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold_bytes) != 1:  # mallopt answers 1 on success
        log.warning("could not fix malloc's mmap threshold at %d bytes; freed large buffers may stay resident",
                    threshold_bytes)
        return False
    return True
