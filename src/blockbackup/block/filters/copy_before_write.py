"""``copy-before-write``: the interception that keeps a point-in-time image.

The filter owns a :class:`~blockbackup.block.block_copy.BlockCopy` from its ``file``
(the source) to its ``target``, and registers a before-write hook on the source node's
request layer. Every modification of the source, by any path (this filter, an export made
before the backup, a parent node, the library API) therefore first copies the old
content of the clusters it touches, then proceeds. Reads pass straight through.

The filter is used two ways: a backup job inserts one above its source (the job runs the
engine's background copy), and ``blockdev-add`` creates one directly for image fleecing,
with a ``snapshot-access`` node on top. The *snapshot API* serves that node:

- :meth:`CopyBeforeWriteDriver.snapshot_read` reads the point-in-time view: from the
  target where a cluster was already copied (``done``), from the source otherwise. A read
  from the source registers itself, and a guest write waits for overlapping ones after
  its copy is made, so the read never sees a later write.
- :meth:`~CopyBeforeWriteDriver.snapshot_block_status` is the block status of that view.
- :meth:`~CopyBeforeWriteDriver.snapshot_discard` gives up part of the view: the area is
  dropped from ``access`` and from the copy (no further copy-before-write there) and
  discarded on the target, freeing the temporary space. Reads there then fail (EACCES).

``bitmap`` (``{node, name}``) limits the copy, and the view, to the clusters dirty in
that bitmap; reads of other clusters fail with EACCES.

What a failed copy does is ``on-cbw-error``:

- ``break-guest-write`` (default): the guest write fails; the snapshot stays intact.
- ``break-snapshot``: the guest write goes on; the snapshot is marked broken (the backup
  job then fails with that error, snapshot reads fail with EACCES) and no further copies
  are made.

``cbw-timeout`` (seconds, 0 = none) bounds how long a guest write waits for its copy; a
timed-out copy counts as a failed one (ETIMEDOUT) and goes on in the background.

``x-cluster-size`` (a blockbackup extension for tests and experts) overrides QEMU's
cluster-size rule with an exact power of two, down to 512 bytes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Coroutine, Iterable
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from blockbackup.block.bitmap import Bitmap
from blockbackup.block.block_copy import BlockCopy, CopyError, backup_cluster_size
from blockbackup.block.dirty_bitmap import find_bitmap
from blockbackup.block.driver import Extent, Status, io_error, register
from blockbackup.block.filters.forwarding import FilterDriver
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import ChildRole
from blockbackup.block.reqlist import ReqList
from blockbackup.errors import BlockBackupError

log = logging.getLogger(__name__)


class OnCbwError(StrEnum):
    """``on-cbw-error``: what a failed copy-before-write does (QEMU's ``OnCbwError``)."""

    BREAK_GUEST_WRITE = "break-guest-write"
    BREAK_SNAPSHOT = "break-snapshot"


#: The one default of ``on-cbw-error`` (the filter, ``blockdev-backup``, the library).
ON_CBW_ERROR_DEFAULT = OnCbwError.BREAK_GUEST_WRITE


class DirtyRuns(Protocol):
    """What the ``bitmap`` option needs from a dirty bitmap: its dirty runs."""

    def runs(self, offset: int = 0, end: int | None = None) -> Iterable[tuple[int, int]]: ...


def _warn(message: str) -> None:
    log.warning("%s", message.removeprefix("warning: "))


def _access_denied() -> OSError:
    return io_error(errno.EACCES, "the snapshot is not available there")


@register
class CopyBeforeWriteDriver(FilterDriver):
    """Filter above a source: copies old data to the target before the source changes.

    Its own I/O is the source's, forwarded (:class:`FilterDriver`), inline twins
    included: the interception is not here but on the source node (its before-write
    hook), which every write to the source passes, from whatever parent.
    """

    driver_name: ClassVar[str] = "copy-before-write"

    def __init__(
        self,
        node: BlockNode,
        source: BlockNode,
        target: BlockNode,
        cluster_size: int,
        on_cbw_error: OnCbwError,
        timeout: float | None,
        bitmap: DirtyRuns | None = None,
    ) -> None:
        super().__init__(node, source)
        self.source = source
        self.target = target
        self.on_cbw_error = on_cbw_error
        self.timeout = timeout
        self.snapshot_error: OSError | None = None
        #: Set when the snapshot breaks, so the job stops waiting for copies that are moot.
        self.broken = asyncio.Event()
        to_copy = None
        if bitmap is not None:
            to_copy = Bitmap(source.size, cluster_size)
            for start, length in bitmap.runs():
                to_copy.set(start, length)
        self.block_copy = BlockCopy(source, target, cluster_size, to_copy=to_copy)
        self.cluster_size = cluster_size
        #: Clusters the snapshot view may be read from.
        self.access = self.block_copy.copy_bitmap.copy()
        #: Clusters whose T0 content is on the target.
        self.done = Bitmap(source.size, cluster_size)
        self.block_copy.on_copied = self.done.set
        self._source_readers = ReqList()
        self._target_readers = ReqList()
        source.add_before_write(self._admit_write)
        target.write_blocker = (node.name, "target")

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> CopyBeforeWriteDriver:
        source = await opts.child("file")
        target = await opts.child("target")
        bitmap = cls._bitmap_option(opts)
        on_cbw_error = OnCbwError(
            opts.enum("on-cbw-error", tuple(OnCbwError), ON_CBW_ERROR_DEFAULT.value)
        )
        timeout = opts.int("cbw-timeout", 0)
        if not 0 <= timeout <= 0xFFFFFFFF:
            raise BlockBackupError("Parameter 'cbw-timeout' expects uint32_t")
        min_cluster = opts.int("min-cluster-size", 0)
        if min_cluster and min_cluster & (min_cluster - 1):
            raise BlockBackupError("min-cluster-size needs to be a power of 2")
        exact_cluster = opts.int("x-cluster-size", 0)
        if exact_cluster and (exact_cluster < 512 or exact_cluster & (exact_cluster - 1)):
            raise BlockBackupError("x-cluster-size must be a power of 2 and at least 512")
        if source.size != target.size:
            raise BlockBackupError("Source and target image have different sizes")
        node.add_child("file", source, ChildRole.SNAPSHOT_SOURCE | ChildRole.PRIMARY)
        node.add_child("target", target, ChildRole.SNAPSHOT_TARGET)
        cluster = exact_cluster or backup_cluster_size(target, min_cluster, _warn)
        return cls(node, source, target, cluster, on_cbw_error, timeout or None, bitmap)

    @staticmethod
    def _bitmap_option(opts: Options) -> DirtyRuns | None:
        sub = opts.sub("bitmap", None)
        if sub is None:
            return None
        node_name = sub.str("node")
        name = sub.str("name")
        sub.finish()
        node = opts.graph.find(node_name)
        if node is None:
            raise BlockBackupError(f"Node '{node_name}' not found")
        bitmap = find_bitmap(node, name)  # the graph's registry of that node
        if bitmap is None:
            raise BlockBackupError(f"Dirty bitmap '{name}' not found")
        return bitmap

    # -- the guest path ----------------------------------------------------------------------

    def _cluster_range(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        return offset - offset % cs, min(-(-(offset + length) // cs) * cs, self.source.size)

    def _admit_write(self, offset: int, length: int) -> Coroutine[Any, Any, None] | None:
        """The source's before-write hook: None when the write may go ahead now, else the
        coroutine it awaits first (holding nothing until it runs).

        The write may go ahead when the snapshot is broken (no more copies), or when every
        cluster it touches is copied (already, or inline now) and no snapshot read from the
        source overlaps them. The awaited path copies first and waits for the readers
        after; neither changes the other, so here the readers are looked at first and an
        inline copy is tried only if none is in the way.
        """
        if self.snapshot_error is not None:
            return None
        start, end = self._cluster_range(offset, length)
        if self._source_readers.find_conflict(start, end - start) is None:
            copy = self.block_copy.admit_write(offset, length, self.timeout)
            if copy is None:
                return None
            copy.close()  # holds nothing until run: the awaited path admits it again
        return self._before_write(offset, length)

    async def _before_write(self, offset: int, length: int) -> None:
        if self.snapshot_error is not None:  # broke since the write was admitted
            return
        copy = self.block_copy.admit_write(offset, length, self.timeout)
        try:
            if copy is not None:
                await copy
        except CopyError as err:
            self._copy_failed(err.err)
            return
        except TimeoutError:
            self._copy_failed(io_error(errno.ETIMEDOUT, "copy-before-write timed out"))
            return
        # Snapshot reads that started from the source before the copy must end before
        # the source changes under them.
        start, end = self._cluster_range(offset, length)
        await self._source_readers.wait_conflicts(start, end - start)

    def _copy_failed(self, err: OSError) -> None:
        if self.on_cbw_error == "break-guest-write":
            raise err
        log.warning("copy-before-write failed, snapshot broken: %s", err)
        self.snapshot_error = err
        self.broken.set()

    # -- the snapshot API (snapshot-access) --------------------------------------------------

    def _check_access(self, offset: int, end: int) -> None:
        if self.snapshot_error is not None:
            raise _access_denied()
        if end > offset and self.access.next_clear(offset, end) is not None:
            raise _access_denied()

    def _run(self, offset: int, end: int) -> tuple[bool, int]:
        """(done?, end of the run of clusters from ``offset`` with the same state)."""
        done = self.done.get(offset)
        nxt = self.done.next_clear(offset, end) if done else self.done.next_set(offset, end)
        return done, end if nxt is None else max(nxt, offset + 1)

    async def snapshot_read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """The point-in-time content of ``[offset, offset+length)``; EACCES where the
        snapshot is not available (discarded, outside ``bitmap``, or broken)."""
        end = offset + length
        self._check_access(offset, end)
        pieces: list[bytes | bytearray | memoryview] = []
        pos = offset
        while pos < end:
            done, run_end = self._run(pos, end)
            readers = self._target_readers if done else self._source_readers
            child = self.target if done else self.source
            req = readers.add(pos, run_end - pos)
            try:
                pieces.append(await child.read(pos, run_end - pos))
            finally:
                readers.remove(req)
            pos = run_end
        if self.snapshot_error is not None:  # broke while we read: the data may be new
            raise _access_denied()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def snapshot_block_status(self, offset: int, length: int) -> Extent:
        """Block status of the view at ``offset`` (EACCES where it is not available)."""
        cs = self.cluster_size
        first_end = min(offset - offset % cs + cs, self.source.size)
        self._check_access(offset, first_end)
        end = offset + length
        if (clear := self.access.next_clear(offset, end)) is not None:
            end = clear
        done, run_end = self._run(offset, end)
        readers = self._target_readers if done else self._source_readers
        child = self.target if done else self.source
        req = readers.add(offset, run_end - offset)
        try:
            extent = await child.block_status(offset, run_end - offset)
        finally:
            readers.remove(req)
        status = extent.status & (Status.DATA | Status.ZERO)
        if not status:
            status = Status.DATA
        return Extent(offset, extent.length, status | Status.ALLOCATED)

    async def snapshot_discard(self, offset: int, length: int) -> None:
        """Give up the view of whole clusters in the range: free them on the target and
        never copy them again; later snapshot reads there fail with EACCES."""
        cs = self.cluster_size
        size = self.source.size
        start = -(-offset // cs) * cs
        end = offset + length
        end = size if end >= size else end - end % cs
        if end <= start:
            return
        self.access.reset(start, end - start)
        await self.block_copy.reset(start, end - start)
        await self._source_readers.wait_conflicts(start, end - start)
        await self._target_readers.wait_conflicts(start, end - start)
        self.done.reset(start, end - start)
        await self.target.discard(start, end - start)

    # -- what the filter changes of the forwarded I/O ----------------------------------------

    async def flush(self) -> None:
        await self.source.flush()
        await self.target.flush()

    async def close(self) -> None:
        self.source.remove_before_write(self._admit_write)
        self.target.write_blocker = None
        await self.block_copy.aclose()
