"""block-copy's background pass: every dirty cluster, in parallel chunks, behind the guests.

Above the copy methods (:mod:`.methods`), beside the guest path (:mod:`.guest`), which it
never calls: what it needs to know of guests (whether they need copies now, or did a
moment ago) is in the state (:mod:`.state`).

The pass claims chunks in order, up to ``max_workers`` in flight, each a task it owns;
zero extents are widened to one chunk however long; short dirty areas (a bitmap's
scattered clusters) are gathered, several to a chunk; the rate limit is charged before a
chunk is claimed; while guest writes need copies, at most ``BACKOFF_WORKERS`` chunks run
(not zero: under a constant guest load the backup must still finish); every
``DROP_BEHIND`` bytes of data the target's page cache is dropped. Its blocking calls run
in the background thread pool, so guest I/O never queues behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockbackup._aio import background_io
from blockbackup.block.bitmap import Bitmap
from blockbackup.block.block_copy import tunables
from blockbackup.block.block_copy.methods import DATA_STATUS, CopyError, CopyMethods
from blockbackup.block.driver import Extent
from blockbackup.block.ratelimit import RateLimit

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BackgroundSettings:
    """Knobs of one background pass (QEMU's ``x-perf``)."""

    max_workers: int = tunables.MAX_WORKERS
    max_chunk: int = 0  # 0: no cap beyond the method's own chunk size


class BackgroundCopy(CopyMethods):
    """The background pass over every dirty cluster (:meth:`run_background`)."""

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        cluster_size: int,
        *,
        to_copy: Bitmap | None = None,
        use_copy_range: bool = False,
        compress: bool = False,
        skip_unallocated: bool = False,
        memory_limit: int = tunables.MAX_MEMORY,
    ) -> None:
        super().__init__(
            source,
            target,
            cluster_size,
            to_copy=to_copy,
            use_copy_range=use_copy_range,
            compress=compress,
            skip_unallocated=skip_unallocated,
            memory_limit=memory_limit,
        )
        #: ``data_copied`` at the last drop-behind, and the drop in flight.
        self._dropped_at = 0
        self._dropping: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        #: The source's status over the last extent the background looked up (see
        #: :meth:`_widen_over_zeroes`).
        self._known_status: Extent | None = None

    def kick(self) -> None:
        """Wake a background pass sleeping on the rate limit (the speed changed)."""
        self._kick.set()

    async def run_background(
        self, settings: BackgroundSettings, rate: RateLimit | None = None
    ) -> None:
        """One pass over every dirty cluster, ``max_workers`` chunks in parallel.

        Returns when nothing is left to copy (nothing dirty, nothing in flight); raises
        ``CopyError`` for the first failed chunk, after the chunks already running have
        finished, with the failed range dirty again. Cancelling stops launching chunks and
        waits for the running ones, so the bitmap is exact whenever this returns or raises.
        """
        chunk = self._chunk_limit(settings.max_chunk)
        running: set[asyncio.Task[None]] = set()
        failure: list[CopyError] = []
        slots = asyncio.Semaphore(settings.max_workers)

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()
            _collect(task, failure)

        position = 0
        try:
            with background_io():
                while not failure:
                    if len(running) >= tunables.BACKOFF_WORKERS and self._guests_copying():
                        await self._wait_guests_or_chunk(running)  # guest writes first
                        continue
                    await slots.acquire()
                    self._drop_behind()
                    area = self.copy_bitmap.next_dirty_area(position, self.source.size, chunk)
                    if area is None and position:
                        position = 0
                        area = self.copy_bitmap.next_dirty_area(0, self.source.size, chunk)
                    if area is None:
                        slots.release()
                        if not await self._wait_for_any(running):
                            break
                        continue
                    looked = await self._widen_over_zeroes(area)
                    if looked is None or failure:  # a chunk failed meanwhile: launch no more
                        slots.release()
                        continue
                    (offset, length), extent = looked
                    # From here to the claim nothing awaits: what is gathered is still dirty.
                    areas = self._gather(offset, length, extent, chunk)
                    total = sum(n for _o, n in areas)
                    delay = rate.delay_for(total) if rate is not None else 0.0
                    if delay > 0:
                        slots.release()  # wait, then look again: the area may be gone
                        await self.throttled_sleep(delay)
                        continue
                    if rate is not None:
                        rate.charge(total)
                    position = areas[-1][0] + areas[-1][1]
                    if len(areas) == 1:
                        req = self._claim(offset, length)
                        copy = self._copy_claimed(req, offset, length, budget=True, status=extent)
                    else:
                        copy = self._copy_batch([(self._claim(o, n), o, n) for o, n in areas])
                    task = self._spawn(copy)
                    running.add(task)
                    task.add_done_callback(finished)
        finally:
            await self._settle(running)
        if failure:
            raise failure[0]

    def _drop_behind(self) -> None:
        """Every ``DROP_BEHIND`` bytes of data copied, let the target write back and evict
        its page cache, in a background-pool call of its own.

        Why: nobody reads a backup back soon. Left cached, a whole disk's copy evicts what
        the host does read, and every page of it is fresh memory. On a VM that hands freed
        memory back to its host (measured here), touching fresh memory costs about 10 us a
        page once the warm free memory is used up: a guest's 64 KiB copy-before-write went
        from 20 to 150 us. Dropping behind keeps reusing the same warm pages.
        """
        if not self._early_writeback or self.data_copied - self._dropped_at < tunables.DROP_BEHIND:
            return
        if self._dropping is not None and not self._dropping.done():
            return
        self._dropped_at = self.data_copied
        self._dropping = self._spawn(self.target.drop_cache())

    async def _widen_over_zeroes(
        self, area: tuple[int, int]
    ) -> tuple[tuple[int, int], Extent | None] | None:
        """Let one chunk cover a whole zero (or skipped) extent, however long.

        Writing zeroes, or nothing, costs the same for 64 KiB as for 1 TiB, so a sparse disk
        takes a few chunks, not one per MiB: the cost follows the data. Returns the area to
        claim and the status read for it, which the chunk reuses (``None``: the area changed
        while we looked; look again). Clusters still dirty after the await were not claimed
        meanwhile, so their content, and the status read here, is still that of T0.

        For the same reason the last extent read stays true for every cluster of it that is
        still dirty, so the next chunks inside it cost no block-status round trip: a disk
        of data is one extent, looked up once, not once per chunk.
        """
        offset, length = area
        known = self._known_status
        if known is not None and known.offset <= offset < known.end:
            extent: Extent | None = Extent(offset, known.end - offset, known.status)
        else:
            try:
                extent = await self.source.block_status(offset, self.source.size - offset)
            except OSError:
                extent = None  # the chunk's own block-status call will report it
            # A guest write may have claimed part of the area while we waited: look again.
            if self.copy_bitmap.next_clear(offset, offset + length) is not None:
                return None
            self._known_status = extent
        if extent is None:
            return area, None
        skippable = self.skip_unallocated and not extent.is_allocated
        if extent.length < length and self._mixed_chunks():
            # More extents before the chunk ends: copy the whole chunk in one call that
            # reads holes as zeroes and leaves zero clusters unwritten, rather than one
            # chunk (and block-status calls) per extent. A disk of small scattered extents
            # costs chunks, not extents.
            return area, Extent(offset, length, DATA_STATUS)
        if not (extent.is_zero or skippable) or extent.length <= length:
            return area, extent
        span = extent.length
        if extent.end != self.source.size:
            span -= span % self.cluster_size
        if span <= length:
            return area, extent
        widened = self.copy_bitmap.next_dirty_area(offset, offset + span, span)
        if widened is None or widened[0] != offset:
            return None
        return widened, extent

    def _gather(
        self, offset: int, length: int, extent: Extent | None, chunk: int
    ) -> list[tuple[int, int]]:
        """The area to claim, and after a short one the next dirty areas, to copy as one
        batch (:meth:`_copy_batch`) of up to ``chunk`` bytes and ``BATCH_AREAS`` areas.

        Why: after a few scattered writes, a dirty bitmap is thousands of isolated
        clusters, and a chunk each cost its task, its read and its write round trips
        (0.4-0.6 ms of CPU a 64 KiB cluster, measured) for 64 KiB of data. A batch reads
        the source's status of none of them: they are read, and zeroes among them found
        in the data, as the buffered copy does; a zero extent goes the chunk's way.
        """
        area = (offset, length)
        if length >= chunk or extent is None or extent.is_zero or not self._batches():
            return [area]
        areas = [area]
        total = length
        end = self.source.size
        while total < chunk and len(areas) < tunables.BATCH_AREAS:
            found = self.copy_bitmap.next_dirty_area(offset + length, end, chunk - total)
            if found is None:
                break
            offset, length = found
            areas.append(found)
            total += length
        return areas

    def _guests_copying(self) -> bool:
        """Whether guest writes need copies now or did a moment ago.

        A guest's copy is over in well under a millisecond, so "one is active right now"
        would let the background flood in between two of them; guests writing to uncopied
        clusters keep the background backed off for ``GUEST_RECENT`` after each copy.
        """
        return bool(self._guest_copies) or (
            time.monotonic() - self._last_guest_copy < tunables.GUEST_RECENT
        )

    async def _wait_guests_or_chunk(self, running: set[asyncio.Task[None]]) -> None:
        """Wait for a running chunk to finish, or for the guests to stop needing copies."""
        quiet = tunables.GUEST_RECENT - (time.monotonic() - self._last_guest_copy)
        await asyncio.wait(
            set(running), timeout=max(quiet, 0.001), return_when=asyncio.FIRST_COMPLETED
        )

    async def _wait_for_any(self, running: set[asyncio.Task[None]]) -> bool:
        """Nothing dirty: wait for a running chunk or a guest copy. False when all is done."""
        if running:
            await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
            return True
        in_flight = next(iter(self.reqs), None)
        if in_flight is None:
            return False
        await in_flight.wait()
        return True

    async def throttled_sleep(self, delay: float) -> None:
        """Sleep for the rate limit; :meth:`kick` cuts it short."""
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._kick.wait()


def _collect(task: asyncio.Task[None], failure: list[CopyError]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, CopyError):
        failure.append(exc)
    elif exc is not None:
        failure.append(CopyError(OSError(errno.EIO, f"internal error: {exc!r}"), is_read=False))
        log.error("copy task failed unexpectedly", exc_info=exc)
