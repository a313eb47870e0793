"""Keep freed memory in the process for the next buffer, instead of handing it back.

Why: a restore or a backup into the repository allocates fresh buffers for every
request (1 MiB reads, the run of a pack that serves one, each chunk's encoded, decrypted
or decompressed bytes), in many threads. glibc gives freed memory at the top of a
thread's heap back to the kernel once about twice the last large block is free, so each
new buffer was fresh pages again: a page fault and a zeroed page per 4 KiB. Measured
(512 MiB image): a restore took 83,000-135,000 page faults for 384 MiB of data, 35,000
with the thresholds below (a backup 67,000-76,000 -> 45,000-47,000); restore CPU -10-15%
(1 GiB, alternating), backup CPU -4% and wall -4% (512 MiB, four alternating pairs, each
after the benchmark's memory settling). Fixed thresholds (``mallopt``) stop both the
trimming and the dynamic mmap threshold, so freed buffers are reused; memory stays
bounded by what the command has in flight at its peak (RSS did not change), and fewer
arenas keep that peak from being held once per thread.

Not for verify, which was slower with it (wall 1.32-1.53 -> 1.59-1.78 s at 1 GiB, RSS
+17 MiB; perhaps its three pack-reading threads sharing fewer arenas), nor for the
long-lived daemon.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks this large or larger are mmapped and unmapped when freed (a restore's largest
#: buffers, 1 MiB requests and pack runs of up to 8 MiB, stay below it and are reused).
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
