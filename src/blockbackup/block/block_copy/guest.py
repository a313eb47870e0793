"""block-copy's guest path: the copy-before-write of a guest write.

Above the copy methods (:mod:`.methods`), beside the background pass, which it never
calls. Guest writes come first: a copy-before-write claims and copies only the clusters
its write covers, at once, ignoring the rate limit and the memory budget, and leaves in
the state (:mod:`.state`) when guests last needed a copy, so that the background backs
off. Each request is admitted by one function, :meth:`GuestCopy.admit_write`, which
either copies inline (nothing to await) or returns what must be awaited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from blockbackup._aio import without_inline_yields
from blockbackup.block.block_copy.methods import DATA_STATUS, CopyError, CopyMethods
from blockbackup.block.driver import Extent


class GuestCopy(CopyMethods):
    """Copy-before-write for guest writes (:meth:`admit_write`)."""

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
