"""block-copy's sizes and timings, in one module that every layer of the engine reads.

Why a module of its own: the engine's code reads these at call time, as ``tunables.NAME``,
so that a test (or a measurement) that sets one here changes the engine's behaviour at
once, whichever module of the package uses it. Set them here, not on the package, which
re-exports them only so that they can be imported by name as before.
"""

from __future__ import annotations

MIN_CLUSTER_SIZE = 64 * 1024
MAX_WORKERS = 64
MAX_MEMORY = 128 * 1024 * 1024
MAX_BUFFER = 1024 * 1024
MAX_COPY_RANGE = 16 * 1024 * 1024
#: A chunk copied by a target that reads the source itself (a repository target: into its
#: encoder processes' memory, none of the copy's). Measured, 2 GiB first backup into a
#: repository: 1 MiB 3.64-3.71 s, 2 MiB 3.36-3.40 s, 4 MiB 3.21-3.30 s (+13 MiB RSS).
MAX_PULL = 2 * 1024 * 1024
#: Read + write between local files go through a buffer this size, a piece at a time: it
#: stays in the CPU cache between the read and the write, and each write holds the target
#: file's lock briefly, so a guest's copy-before-write to the same file never waits long.
COPY_PIECE = 128 * 1024
#: Short dirty areas (a bitmap's isolated clusters) copied by one background chunk, in one
#: read and one write call: the chunk's per-call costs, paid once for them all.
BATCH_AREAS = 16
#: Background chunks allowed in flight while guest copy-before-writes are active: enough to
#: keep the backup moving under a constant guest load, few enough not to crowd the guest.
BACKOFF_WORKERS = 1
#: Seconds after a guest's copy-before-write during which the background stays backed off.
GUEST_RECENT = 0.05
#: Data copied to the target between two drop-behinds (see
#: :meth:`~blockbackup.block.block_copy.background.BackgroundCopy._drop_behind`).
DROP_BEHIND = 64 * 1024 * 1024
