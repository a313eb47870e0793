"""Keep freed memory in the process for the next buffer, instead of handing it back.

Why: a repository command's data path allocates a fresh buffer for every request (1 MiB
reads and the run of a pack that serves them, each chunk's decrypted and decompressed
bytes), in many threads. glibc gives freed memory at the top of a thread's heap back to
the kernel once more than about twice the last large block is free, so each new buffer
is fresh pages again: a page fault and a zeroed page per 4 KiB. Measured (512 MiB restore):
94,000 page faults for 384 MiB of data, about 20% of its CPU; on a VM whose freed memory
goes back to the host, touching such a page costs up to 10 us.

Fixed thresholds (``mallopt``) stop both the trimming and the dynamic mmap threshold, so
freed buffers are reused. Memory stays bounded by what the command has in flight at its
peak (its buffers are bounded), and fewer arenas keep that peak from being held per
thread. Only for the short-lived repository commands (backup into a repository, restore,
verify), not for the daemon.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks this large or larger are mmapped and unmapped when freed (whole packs read for
#: verify are 16 MiB: below it, reused).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of a heap kept before any is given back.
TRIM_THRESHOLD = 256 << 20
#: Arenas (glibc's default is 8 per core: each may hold its own peak).
ARENA_MAX = 4


def keep_freed_memory() -> bool:
    """Set the thresholds; False where there is no glibc ``mallopt`` (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, ARENA_MAX),
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
