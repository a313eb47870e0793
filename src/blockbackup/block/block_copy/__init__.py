"""block-copy: the one copy engine, shared by a backup's background copy and its
copy-before-write interception.

State (all owned by the event loop):

- ``copy_bitmap``: one bit per cluster, set = "still to copy". A region is *claimed* by
  clearing its bits and registering it in ``reqs`` (the in-flight list) in one step, so
  nothing else can copy it; a failed or abandoned copy sets its bits again. This keeps the
  bitmap exact at every await: cancel, then start again, is resume.
- ``reqs``: the in-flight copies. Whoever needs a cluster that is in flight waits for it,
  then looks again (the copy may have failed). Each cluster is copied exactly once, by
  whoever claims it first: the background loop or a guest write.
- copy tasks are owned here (``_tasks``), never fire-and-forget: :meth:`aclose` waits for
  every one, and for the copies guest writes run themselves, so no copy is in flight after
  the owner is done with the engine.

Guest writes come first. A copy-before-write (:meth:`admit_write`) claims and copies
only the clusters its write covers, immediately, ignoring the rate limit and the memory
budget; while any is active, the background loop keeps at most ``BACKOFF_WORKERS`` chunks
in flight (not zero: under a constant guest load the backup must still finish). The background loop
also runs its blocking calls in the background thread pool, so guest I/O never queues
behind it.

Chunks follow the source's block status: zero and hole extents become write-zeroes with
unmap (or nothing, if the target already reads as zero there *by itself*: a target whose
unallocated clusters show a backing file, as in classic fleecing where that backing is the
source, gets its zeroes written), so a sparse source gives a sparse target and the cost
follows the data, not the disk size.

Fleecing adds three things: ``on_copied`` tells the copy-before-write filter which clusters
now live on the target (its snapshot reads go there); :meth:`BlockCopy.reset` drops
clusters from the copy (a discarded snapshot area is never copied again); and
``discard_source`` discards each copied range of the source after the copy (a backup from
a ``snapshot-access`` node frees the temporary image as it goes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from blockbackup._aio import without_inline_yields
from blockbackup.block.block_copy.background import BackgroundCopy, BackgroundSettings
from blockbackup.block.block_copy.methods import DATA_STATUS, CopyError
from blockbackup.block.block_copy.state import NO_CLUSTER_INFO_WARNING, backup_cluster_size
from blockbackup.block.block_copy.tunables import (
    BACKOFF_WORKERS,
    COPY_PIECE,
    DROP_BEHIND,
    GUEST_RECENT,
    MAX_BUFFER,
    MAX_COPY_RANGE,
    MAX_MEMORY,
    MAX_WORKERS,
    MIN_CLUSTER_SIZE,
)
from blockbackup.block.driver import Extent

__all__ = [
    "BACKOFF_WORKERS",
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


class BlockCopy(BackgroundCopy):
    """Copies clusters of ``source`` to the same offsets of ``target``, each exactly once."""

    def admit_write(
        self, offset: int, length: int, timeout: float | None = None
    ) -> Coroutine[Any, Any, None] | None:
        """The copy-before-write of a guest write of ``[offset, offset+length)``, admitted.

        None when every cluster the write touches is copied: already, or just now from
        the page cache (:meth:`_copy_now`), with no task and no loop iteration for the
        guest. Otherwise the coroutine that copies the rest: it returns when all of them
        are on the target and raises ``CopyError`` if a copy failed, ``TimeoutError`` if
        ``timeout`` (seconds) passed first (the copies go on). It holds nothing until it
        runs (the clusters not copied are still dirty), so it may be closed unrun.
        """
        if self._copied_now(offset, length):
            return None
        return self._copy_before_write(offset, length, timeout)

    async def _copy_before_write(self, offset: int, length: int, timeout: float | None) -> None:
        if not self.needs_copy(offset, length):
            return  # copied already, nothing in flight: most guest writes during a backup
        start, end = self._cluster_range(offset, length)
        self._guest_copies += 1
        self._guests_idle.clear()
        self._last_guest_copy = time.monotonic()
        try:
            if timeout is None:
                with without_inline_yields():  # the guest write yields soon anyway
                    await self._copy_all(start, end, own_task=False)
            else:
                async with asyncio.timeout(timeout):
                    await self._copy_all(start, end, own_task=True)
        finally:
            self._guest_copies -= 1
            if self._guest_copies == 0:
                self._guests_idle.set()

    def _copied_now(self, offset: int, length: int) -> bool:
        """Whether every cluster the write touches is copied, trying the copies inline.

        False, with the clusters not copied still dirty, when one is in flight or cannot
        be copied at once (not cached, a target that must wait, zeroes, a block status or
        a source discard to do).
        """
        if not self.needs_copy(offset, length):
            return True
        start, end = self._cluster_range(offset, length)
        if (
            self.skip_unallocated
            or self.discard_source
            or self.reqs.find_conflict(start, end - start) is not None
        ):
            return False
        self._last_guest_copy = time.monotonic()
        while (area := self.copy_bitmap.next_dirty_area(start, end, end - start)) is not None:
            # Claimed by clearing the bits alone: nothing awaits before they are final.
            area_offset, area_length = area
            self.copy_bitmap.reset(area_offset, area_length)
            try:
                copied = self._copy_now(area_offset, area_length)
            except CopyError:
                copied = False  # the awaiting call tries again and reports it
            if not copied:
                self.copy_bitmap.set(area_offset, area_length)
                return False
            self.bytes_done += area_length
            self.data_copied += area_length
            if self.on_copied is not None:
                self.on_copied(area_offset, area_length)
            if self.on_progress is not None:
                self.on_progress()
        return True

    async def _copy_all(self, start: int, end: int, *, own_task: bool) -> None:
        """Copy the dirty clusters of ``[start, end)`` and wait for those in flight.

        ``own_task``: run each copy in a task of its own, which goes on if the caller stops
        waiting (a timeout). Without a timeout the caller runs it, one loop iteration
        sooner: a cancelled caller leaves its claim dirty again (see :meth:`_copy_claimed`).

        Each copy is at most one chunk (:meth:`_chunk_limit`, QEMU's copy size), as in the
        background: a target that paces requests (a ``throttle`` node) then paces a large
        guest write's copy too, and ``cbw-timeout`` bounds it. One request of the whole
        write would pass a leaky bucket that is not yet full at once, whatever its size.
        """
        chunk = self._chunk_limit(0)  # guest copies have no x-perf knobs
        while True:
            area = self.copy_bitmap.next_dirty_area(start, end, chunk)
            if area is not None:
                offset, length = area
                req = self._claim(offset, length)
                # A guest waits on this copy: no block-status round trip to the pool unless
                # allocation decides what to copy. Read as data, zero clusters are still
                # found by the zero check and stay holes on the target.
                status = None if self.skip_unallocated else Extent(offset, length, DATA_STATUS)
                copy = self._copy_claimed(req, offset, length, budget=False, status=status)
                if own_task:
                    await asyncio.shield(self._spawn(copy))
                else:
                    await copy
                continue
            conflict = self.reqs.find_conflict(start, end - start)
            if conflict is None:
                return
            await conflict.wait()  # then look again: that copy may have failed

    async def aclose(self) -> None:
        """Wait until no copy is in flight, then free the copy buffers."""
        await self._settle(self._tasks)
        await self._guests_idle.wait()  # copies that guest writes run themselves
        self._free_buffers()
