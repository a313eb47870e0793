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
import contextlib
import errno
import logging
import mmap
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockbackup._aio import background_io, in_background, without_inline_yields
from blockbackup.block.bitmap import Bitmap
from blockbackup.block.block_copy import tunables
from blockbackup.block.block_copy.state import (
    NO_CLUSTER_INFO_WARNING,
    CopyState,
    backup_cluster_size,
)
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
from blockbackup.block.copy_range import SourceReadError
from blockbackup.block.driver import Extent, Status, WriteFlags
from blockbackup.block.ratelimit import RateLimit
from blockbackup.block.reqlist import Request

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode

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

log = logging.getLogger(__name__)


#: The status of an area read as data, with no block-status call.
DATA_STATUS = Status.ALLOCATED | Status.DATA


class CopyError(Exception):
    """A chunk failed; ``is_read`` tells whether the source (read) or the target failed."""

    def __init__(self, err: OSError, *, is_read: bool) -> None:
        super().__init__(err.strerror or str(err))
        self.err = err
        self.is_read = is_read


class _ByteBudget:
    """A semaphore counted in bytes: bounds the memory of buffers in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._freed:
            # A request larger than the whole budget is let through when nothing else runs.
            await self._freed.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def release(self, n: int) -> None:
        async with self._freed:
            self.used -= n
            self._freed.notify_all()


@dataclass(slots=True)
class BackgroundSettings:
    """Knobs of one background pass (QEMU's ``x-perf``)."""

    max_workers: int = tunables.MAX_WORKERS
    max_chunk: int = 0  # 0: no cap beyond the method's own chunk size


class BlockCopy(CopyState):
    """Copies clusters of ``source`` to the same offsets of ``target``, each exactly once."""

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
        super().__init__(source, target, cluster_size, to_copy=to_copy)
        self.use_copy_range = use_copy_range
        self.compress = compress
        self.skip_unallocated = skip_unallocated
        #: Discard each range of the source once it is copied (QEMU's ``discard-source``).
        self.discard_source = False
        self._budget = _ByteBudget(memory_limit)
        self._zeroes = bytes(max(tunables.MAX_BUFFER, cluster_size))
        #: Copy between local files in one blocking call through reused buffers: both
        #: sides are plain files (until a copy says otherwise).
        self._between_files = source.fd_map(0) is not None and target.fd_map(0) is not None
        #: Writing back as the copy goes (and dropping behind) suits the target: not when
        #: told to spare the storage (``cache.no-flush``), nor without a page cache.
        self._early_writeback = target.early_writeback()
        self._buffers: list[mmap.mmap] = []
        self._buffers_kept = max(1, memory_limit // tunables.COPY_PIECE)
        #: ``data_copied`` at the last drop-behind, and the drop in flight.
        self._dropped_at = 0
        self._dropping: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        #: The source's status over the last extent the background looked up (see
        #: :meth:`_widen_over_zeroes`).
        self._known_status: Extent | None = None

    # -- what the methods can do -------------------------------------------------------------

    def _chunk_limit(self, max_chunk: int) -> int:
        """The largest chunk to copy in one call; ``max_chunk`` caps it (0: no cap)."""
        cluster = self.cluster_size
        if self.compress:
            chunk = cluster
        elif self.use_copy_range:
            chunk = max(cluster, tunables.MAX_COPY_RANGE)
        else:
            chunk = max(cluster, tunables.MAX_BUFFER)
        for limit in (self.source.limits.max_transfer, self.target.limits.max_transfer):
            if limit:
                chunk = min(chunk, max(cluster, limit - limit % cluster))
        if max_chunk:
            chunk = min(chunk, max(cluster, max_chunk - max_chunk % cluster))
        return chunk

    def _mixed_chunks(self) -> bool:
        """Whether a chunk may span data and holes: a copy between local files that
        writes no zero cluster (so a sparse target stays sparse) and needs no allocation
        status per cluster (``sync=top``)."""
        return (
            self._between_files
            and not self.use_copy_range
            and not self.compress
            and not self.skip_unallocated
            and self.cluster_size <= tunables.COPY_PIECE
        )

    def _writeback_now(self) -> bool:
        """Whether a chunk starts writeback of what it wrote: the target wants it, and no
        guest wrote for ``GUEST_RECENT``.

        Writeback as the copy goes makes the final flush short (see
        :func:`~blockbackup.block.copy_range.start_writeback`), but while guests write it
        competes with their own page-cache writes (measured: guest rate through NBD during
        a backup 5.2-5.6k -> 2.9-3.7k writes/s with it). To a ``no-flush`` target it only
        costs: 2,000-2,300 MiB/s with it against 3,200-3,500 without (copy offload).
        """
        if not self._early_writeback:
            return False
        return time.monotonic() - self._last_guest_write >= tunables.GUEST_RECENT

    # -- one claimed region ------------------------------------------------------------------

    async def _copy_claimed(
        self, req: Request, offset: int, length: int, *, budget: bool, status: Extent | None = None
    ) -> None:
        """Copy a claimed region; on any failure its bits become dirty again.

        ``status``: the source's block status at ``offset``, if the caller already read it
        while the region was still dirty (so still true).
        """
        done = copied = False
        try:
            copied = await self._copy_region(req, offset, length, budget, status)
            done = True
            if copied and self.on_copied is not None:
                self.on_copied(offset, req.length)
        finally:
            end = offset + req.length
            if not done:
                self.copy_bitmap.set(offset, end - offset)
            self.reqs.remove(req)
            if self.on_progress is not None:
                self.on_progress()
        if copied and self.discard_source:
            # After the claim is gone: the discard goes through the source's request
            # layer, whose copy-before-write hooks may wait for claims of this range.
            await self._discard_source(offset, end - offset)

    async def _discard_source(self, offset: int, length: int) -> None:
        try:
            await self.source.discard(offset, length)
        except OSError as err:
            # Advisory: the copy itself succeeded, and the area stays readable.
            log.warning("discard-source of %d+%d failed: %s", offset, length, err)

    async def _copy_region(
        self, req: Request, offset: int, length: int, budget: bool, status: Extent | None
    ) -> bool:
        """Copy (or skip) a claimed region; True when its content is now on the target."""
        if status is not None and status.offset == offset:
            extent = Extent(offset, min(status.length, length), status.status)
        else:
            try:
                extent = await self.source.block_status(offset, length)
            except OSError as err:
                raise CopyError(err, is_read=True) from err
        if extent.length < length:
            # Shrink to the extent (cluster-aligned) and give the tail back.
            keep = max(
                self.cluster_size, -(-extent.length // self.cluster_size) * self.cluster_size
            )
            if keep < length:
                self.reqs.shrink(req, keep)
                self.copy_bitmap.set(offset + keep, length - keep)
                length = keep
        if self.skip_unallocated and not extent.is_allocated and extent.length >= length:
            self.bytes_skipped += length
            return False
        if extent.is_zero and extent.length >= length:
            await self._write_zeroes(offset, length)
        elif self.use_copy_range and not self.compress:
            await self._copy_offloaded(offset, length, budget)
            self.data_copied += length
        else:
            await self._copy_buffered(offset, length, budget)
            self.data_copied += length
        self.bytes_done += length
        return True

    async def _write_zeroes(self, offset: int, length: int) -> None:
        try:
            if not await self._target_reads_zero(offset, length):
                await self.target.write_zeroes(offset, length, WriteFlags.MAY_UNMAP)
        except OSError as err:
            raise CopyError(err, is_read=False) from err

    async def _target_reads_zero(self, offset: int, length: int) -> bool:
        """Whether the target reads as zeroes there, and will go on doing so by itself.

        With a backing file, an unallocated cluster shows the backing's content, which may
        change (classic fleecing: the backing *is* the source, about to be overwritten), so
        only zeroes the target's own layer stores count.
        """
        own_layer_only = self.target.backing() is not None
        end = offset + length
        while offset < end:
            extent = await self.target.block_status(offset, end - offset)
            if not extent.status & Status.ZERO:
                return False
            if own_layer_only and not extent.status & Status.ALLOCATED:
                return False
            offset = extent.end
        return True

    async def _copy_offloaded(self, offset: int, length: int, budget: bool) -> None:
        try:
            await self.target.copy_range_from(
                self.source,
                offset,
                offset,
                length,
                writeback=in_background() and self._writeback_now(),
            )
        except OSError as err:
            if err.errno != errno.ENOTSUP:
                # copy_file_range cannot tell which side failed; call it the target.
                raise CopyError(err, is_read=False) from err
            log.debug("copy offload unavailable, using read+write: %s", err)
            self.use_copy_range = False
            await self._copy_buffered(offset, length, budget)

    async def _copy_buffered(self, offset: int, length: int, budget: bool) -> None:
        if self._copy_now(offset, length):
            return
        if budget:
            await self._budget.acquire(length)
        try:
            if (
                self._between_files
                and not self.compress
                and in_background()
                and await self._copy_between_files(offset, length)
            ):
                return
            try:
                data = await self.source.read(offset, length)
            except OSError as err:
                raise CopyError(err, is_read=True) from err
            try:
                if self._is_zero(data):
                    if not await self._target_reads_zero(offset, length):
                        await self.target.write_zeroes(offset, length, WriteFlags.MAY_UNMAP)
                elif self.compress:
                    view = memoryview(data)
                    for o in range(0, length, self.cluster_size):
                        await self.target.write(
                            offset + o, view[o : o + self.cluster_size], WriteFlags.COMPRESSED
                        )
                else:
                    await self.target.write(offset, data)
            except OSError as err:
                raise CopyError(err, is_read=False) from err
        finally:
            if budget:
                await self._budget.release(length)

    def _copy_now(self, offset: int, length: int) -> bool:
        """A guest's copy as two page-cache copies on the loop thread; False: not done.

        Why: a guest waits for its copy-before-write, and a fresh buffer plus the awaiting
        read and write paths cost it about a third more than the two system calls. The
        buffer is reused, so nothing may await while it is in use: anything that cannot
        go at once (uncached source data, a target that must wait, zeroes) returns False
        having written nothing, and the awaiting path does it. Not in background jobs
        (their copies go through the thread pool) and not when compressing.
        """
        if in_background() or self.compress or length > tunables.COPY_PIECE:
            return False
        buffer = self._buffers.pop() if self._buffers else mmap.mmap(-1, tunables.COPY_PIECE)
        try:
            with memoryview(buffer) as whole, whole[:length] as view:
                data = self.source.read_now(offset, length, view)
                if data is None or self._is_zero(data):
                    return False
                try:
                    return self.target.write_now(offset, data)
                except OSError as err:
                    raise CopyError(err, is_read=False) from err
        finally:
            self._keep_buffer(buffer)

    def _keep_buffer(self, buffer: mmap.mmap) -> None:
        if len(self._buffers) < self._buffers_kept:
            self._buffers.append(buffer)
        else:
            buffer.close()

    async def _copy_between_files(self, offset: int, length: int) -> bool:
        """Read + write between two local files through a reused buffer, in one thread hop.

        A fresh buffer per chunk costs its page faults and its unmapping on every chunk;
        this path costs neither. False (nothing done) when either side is not a local file.
        """
        piece = tunables.COPY_PIECE
        buffer = self._buffers.pop() if self._buffers else mmap.mmap(-1, piece)
        reuse = True
        try:
            zero_runs = await self.target.copy_through_buffer_from(
                self.source,
                offset,
                offset,
                length,
                buffer,
                self._zeroes,
                writeback=self._writeback_now(),
                grain=self.cluster_size if self.cluster_size <= piece else 0,
                # Plain local files have no backing, and the target is ours alone.
                holes_read_zero=True,
            )
        except asyncio.CancelledError:
            # The thread call goes on without us, through this buffer: it goes with it.
            reuse = False
            raise
        except SourceReadError as err:
            raise CopyError(err, is_read=True) from err
        except OSError as err:
            if err.errno != errno.ENOTSUP:
                raise CopyError(err, is_read=False) from err
            self._between_files = False
            return False
        finally:
            if reuse:
                self._keep_buffer(buffer)
        for start, n in zero_runs:
            await self._write_zeroes(offset + start, n)
        return True

    def _is_zero(self, data: bytes | bytearray | memoryview) -> bool:
        # bytes.startswith takes any buffer and is a memcmp: no copy, no allocation (a
        # memoryview ``==`` goes item by item, 60 times slower; ``bytes(n)`` per chunk
        # would allocate outside the memory budget).
        view = memoryview(data).cast("B")
        zeroes = self._zeroes
        step = len(zeroes)
        return all(zeroes.startswith(view[o : o + step]) for o in range(0, len(view), step))

    def _free_buffers(self) -> None:
        """Free the copy buffers (no copy may be in flight)."""
        while self._buffers:
            buffer = self._buffers.pop()
            try:
                buffer.close()
            except BufferError:
                # A view of it outlives its request (held by a failed request's traceback,
                # say): the mapping goes when that view does. Closing must go on regardless,
                # or the node (and its children's fds) could never be released.
                log.debug("copy buffer still referenced at close; left to the collector")

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
                    delay = rate.delay_for(length) if rate is not None else 0.0
                    if delay > 0:
                        slots.release()  # wait, then look again: the area may be gone
                        await self.throttled_sleep(delay)
                        continue
                    if rate is not None:
                        rate.charge(length)
                    req = self._claim(offset, length)
                    position = offset + length
                    copy = self._copy_claimed(req, offset, length, budget=True, status=extent)
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


def _collect(task: asyncio.Task[None], failure: list[CopyError]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, CopyError):
        failure.append(exc)
    elif exc is not None:
        failure.append(CopyError(OSError(errno.EIO, f"internal error: {exc!r}"), is_read=False))
        log.error("copy task failed unexpectedly", exc_info=exc)
