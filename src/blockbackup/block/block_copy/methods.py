"""block-copy's copy methods: how one claimed region gets to the target.

Above the state (:mod:`.state`), below the two paths that claim regions (the background
pass and the guest path). A claimed region is copied by the first method that fits:
write-zeroes (or nothing) for a zero extent, ``copy_file_range`` offload, one thread call
through a reused buffer into a local file (from a local file, or from a node that reads
into the buffer by itself: a repository snapshot), one thread call of a target that reads
the source itself (a repository target), a read + write on the loop thread when
the source data is cached (a guest's copy), or a read + write through the nodes, within
a memory budget. Whatever the method, a failure leaves the region dirty again, and
``discard-source`` discards what was copied.

The methods decide two things the paths ask about: the largest chunk they copy in one
call (:meth:`CopyMethods._chunk_limit`), and whether a chunk may span data and holes
(:meth:`CopyMethods._mixed_chunks`). Whether a chunk starts writeback of what it wrote
depends on when guests last wrote (:meth:`CopyMethods._writeback_now`), which is why that
time lives in the state below, not in the background pass above.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import time
from typing import TYPE_CHECKING

from blockbackup._aio import in_background
from blockbackup.block.bitmap import Bitmap
from blockbackup.block.block_copy import tunables
from blockbackup.block.block_copy.state import CopyState
from blockbackup.block.copy_range import SourceReadError
from blockbackup.block.driver import Buffer, Extent, PartialWrite, Status, WriteFlags
from blockbackup.block.reqlist import Request

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode

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


class CopyMethods(CopyState):
    """Copies claimed regions of ``source`` to the same offsets of ``target``."""

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
        #: Copy into a local file in one blocking call through reused buffers: the target
        #: is a plain file and the source one too, or a node that reads into a buffer by
        #: itself (a repository snapshot: restore), until a copy says otherwise.
        reader = source.reader(0)
        self._between_files = reader is not None and target.fd_map(0) is not None
        #: The target reads the source itself (a repository target: straight into its
        #: encoder processes), chunk by chunk, where it can (:meth:`BlockNode.pull_from`).
        self._target_pulls = reader is not None and target.driver.pulls()
        #: The reused buffers' size: a piece (see ``COPY_PIECE``), or what the source reads
        #: well in one call (a snapshot decodes a whole request's chunks at once).
        self._piece = max(tunables.COPY_PIECE, reader[0].piece if reader is not None else 0)
        #: Writing back as the copy goes (and dropping behind) suits the target: not when
        #: told to spare the storage (``cache.no-flush``), nor without a page cache.
        self._early_writeback = target.early_writeback()
        self._buffers: list[mmap.mmap] = []
        #: Buffers that batches of short areas are read into (:meth:`_copy_areas`).
        self._batch_buffers: list[mmap.mmap] = []
        self._buffers_kept = max(1, memory_limit // self._piece)

    # -- what the methods can do -------------------------------------------------------------

    def _chunk_limit(self, max_chunk: int) -> int:
        """The largest chunk to copy in one call; ``max_chunk`` caps it (0: no cap)."""
        cluster = self.cluster_size
        if self.compress:
            chunk = cluster
        elif self.use_copy_range:
            chunk = max(cluster, tunables.MAX_COPY_RANGE)
        elif self._target_pulls:
            chunk = max(cluster, tunables.MAX_PULL)
        else:
            chunk = max(cluster, tunables.MAX_BUFFER)
        for limit in (self.source.limits.max_transfer, self.target.limits.max_transfer):
            if limit:
                chunk = min(chunk, max(cluster, limit - limit % cluster))
        if max_chunk:
            chunk = min(chunk, max(cluster, max_chunk - max_chunk % cluster))
        return chunk

    def _mixed_chunks(self) -> bool:
        """Whether a chunk may span data and holes: a copy through a buffer that
        writes no zero cluster (so a sparse target stays sparse), or a target that reads
        the source itself (and stores zero clusters as such), and needs no allocation
        status per cluster (``sync=top``)."""
        return (
            (self._between_files or self._target_pulls)
            and not self.use_copy_range
            and not self.compress
            and not self.skip_unallocated
            and self.cluster_size <= tunables.COPY_PIECE
        )

    def _batches(self) -> bool:
        """Whether short areas may be copied as one batch (:meth:`_copy_batch`): a plain
        read + write copy, with nothing to learn per cluster (allocation for ``sync=top``)
        and nothing to do per area after it (``discard_source``). Between local files a
        chunk is one pool call already."""
        return not (
            self._between_files
            or self.use_copy_range
            or self.compress
            or self.skip_unallocated
            or self.discard_source
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

    async def _copy_batch(self, claims: list[tuple[Request, int, int]]) -> None:
        """Copy claimed areas as one: one read of them all, one write call for their data.

        A failure leaves dirty again every area not known written (a chunk that fails half
        written is dirty again whole); the claims are released together, after the copy.
        """
        done = [False] * len(claims)
        try:
            await self._copy_areas([(offset, length) for _req, offset, length in claims], done)
        finally:
            for (req, offset, length), copied in zip(claims, done, strict=True):
                if not copied:
                    self.copy_bitmap.set(offset, length)
                elif self.on_copied is not None:
                    self.on_copied(offset, length)
                self.reqs.remove(req)
            if self.on_progress is not None:
                self.on_progress()

    async def _copy_areas(self, areas: list[tuple[int, int]], done: list[bool]) -> None:
        """Read the areas in one call into a reused buffer, write their data in one call
        (areas that read as zeroes become write-zeroes, as in :meth:`_copy_buffered`);
        ``done[i]`` is set once area ``i`` is on the target."""
        total = sum(length for _offset, length in areas)
        await self._budget.acquire(total)
        buffer: mmap.mmap | None = self._batch_buffers.pop() if self._batch_buffers else None
        if buffer is None or len(buffer) < total:
            buffer = mmap.mmap(-1, max(total, tunables.MAX_BUFFER))
        try:
            await self._copy_areas_through(areas, done, buffer)
        except asyncio.CancelledError:
            buffer = None  # a thread call may go on through it without us: it goes with it
            raise
        finally:
            if buffer is not None and len(self._batch_buffers) < self._buffers_kept:
                self._batch_buffers.append(buffer)
            await self._budget.release(total)

    async def _copy_areas_through(
        self, areas: list[tuple[int, int]], done: list[bool], buffer: mmap.mmap
    ) -> None:
        try:
            with memoryview(buffer) as whole:
                datas = await self.source.read_many(areas, whole)
        except OSError as err:
            raise CopyError(err, is_read=True) from err
        pieces: list[tuple[int, Buffer]] = []
        indexes = []
        for i, ((offset, length), data) in enumerate(zip(areas, datas, strict=True)):
            if self._is_zero(data):
                await self._write_zeroes(offset, length)
                self._area_done(areas, done, i)
            else:
                pieces.append((offset, data))
                indexes.append(i)
        if not pieces:
            return
        try:
            await self.target.write_many(pieces)
        except PartialWrite as err:
            for i in indexes[: err.written]:
                self._area_done(areas, done, i, data=True)
            raise CopyError(err, is_read=False) from err
        except OSError as err:
            raise CopyError(err, is_read=False) from err
        for i in indexes:
            self._area_done(areas, done, i, data=True)

    def _area_done(
        self, areas: list[tuple[int, int]], done: list[bool], i: int, *, data: bool = False
    ) -> None:
        length = areas[i][1]
        done[i] = True
        self.bytes_done += length
        if data:
            self.data_copied += length

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
            if not self.compress and in_background():
                if self._between_files and await self._copy_between_files(offset, length):
                    return
                if self._target_pulls and await self._pull(offset, length):
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
        buffer = self._buffers.pop() if self._buffers else mmap.mmap(-1, self._piece)
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
        """Read + write into a local file through a reused buffer, in one thread hop.

        A fresh buffer per chunk costs its page faults and its unmapping on every chunk;
        this path costs neither, nor a second thread hop for the write. False (nothing
        done) when the target is not a local file or the source has no reader.
        """
        piece = self._piece
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

    async def _pull(self, offset: int, length: int) -> bool:
        """The target reads the region itself; False: it cannot (nothing done)."""
        try:
            return await self.target.pull_from(self.source, offset, offset, length)
        except SourceReadError as err:
            raise CopyError(err, is_read=True) from err
        except OSError as err:
            raise CopyError(err, is_read=False) from err

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
        self._buffers += self._batch_buffers
        self._batch_buffers.clear()
        while self._buffers:
            buffer = self._buffers.pop()
            try:
                buffer.close()
            except BufferError:
                # A view of it outlives its request (held by a failed request's traceback,
                # say): the mapping goes when that view does. Closing must go on regardless,
                # or the node (and its children's fds) could never be released.
                log.debug("copy buffer still referenced at close; left to the collector")
