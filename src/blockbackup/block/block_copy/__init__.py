"""block-copy: the one copy engine, shared by a backup's background copy and its
copy-before-write interception.

Split by concern into layers, each module importing only those below it:

- :mod:`.tunables`: sizes and timings, read at call time (set them there);
- :mod:`.state`: the to-copy bitmap, the in-flight list, progress, the copy tasks, and
  when guests last wrote or needed a copy;
- :mod:`.methods`: how one claimed region gets to the target (zeroes, offload, between
  local files, inline from the page cache, read + write), the memory budget, the buffers;
- :mod:`.background`: the background pass (chunks, widening over zeroes, backing off from
  guests, rate limit, drop-behind);
- :mod:`.guest`: the copy-before-write of guest writes (:meth:`BlockCopy.admit_write`);
- this module: :class:`BlockCopy`, the engine its users (the backup job, the
  copy-before-write filter) hold.

Each layer is a class that extends the one below (:class:`.state.CopyState`, then
:class:`.methods.CopyMethods`, then :class:`.background.BackgroundCopy` and
:class:`.guest.GuestCopy`, which know nothing of each other), so the guest's inline path
reads its state as attributes of one object, with no delegation in between.

Guest writes come first. A copy-before-write claims and copies only the clusters its write
covers, immediately, ignoring the rate limit and the memory budget; while any is active,
the background keeps at most ``BACKOFF_WORKERS`` chunks in flight. Chunks follow the
source's block status: zero and hole extents become write-zeroes with unmap (or nothing,
if the target already reads as zero there *by itself*: a target whose unallocated clusters
show a backing file, as in classic fleecing where that backing is the source, gets its
zeroes written), so a sparse source gives a sparse target and the cost follows the data,
not the disk size.

Fleecing adds three things: ``on_copied`` tells the copy-before-write filter which clusters
now live on the target (its snapshot reads go there); :meth:`BlockCopy.reset` drops
clusters from the copy (a discarded snapshot area is never copied again); and
``discard_source`` discards each copied range of the source after the copy (a backup from
a ``snapshot-access`` node frees the temporary image as it goes).
"""

from __future__ import annotations

from blockbackup.block.block_copy.background import BackgroundCopy, BackgroundSettings
from blockbackup.block.block_copy.guest import GuestCopy
from blockbackup.block.block_copy.methods import CopyError
from blockbackup.block.block_copy.state import NO_CLUSTER_INFO_WARNING, backup_cluster_size
from blockbackup.block.block_copy.tunables import (
    BACKOFF_WORKERS,
    BATCH_AREAS,
    COPY_PIECE,
    DROP_BEHIND,
    GUEST_RECENT,
    MAX_BUFFER,
    MAX_COPY_RANGE,
    MAX_MEMORY,
    MAX_WORKERS,
    MIN_CLUSTER_SIZE,
)

__all__ = [
    "BACKOFF_WORKERS",
    "BATCH_AREAS",
    "COPY_PIECE",
    "DROP_BEHIND",
    "GUEST_RECENT",
    "MAX_BUFFER",
    "MAX_COPY_RANGE",
    "MAX_MEMORY",
    "MAX_WORKERS",
    "MIN_CLUSTER_SIZE",
    "NO_CLUSTER_INFO_WARNING",
    "BackgroundSettings",
    "BlockCopy",
    "CopyError",
    "backup_cluster_size",
]


class BlockCopy(GuestCopy, BackgroundCopy):
    """Copies clusters of ``source`` to the same offsets of ``target``, each exactly once.

    Copy tasks are owned here, never fire-and-forget: :meth:`aclose` waits for every one,
    and for the copies guest writes run themselves, so no copy is in flight after the
    owner is done with the engine.
    """

    async def aclose(self) -> None:
        """Wait until no copy is in flight, then free the copy buffers."""
        await self._settle(self._tasks)
        await self._guests_idle.wait()  # copies that guest writes run themselves
        self._free_buffers()
