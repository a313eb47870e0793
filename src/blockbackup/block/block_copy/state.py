"""block-copy's state: what is still to copy, what is in flight, progress, guests' activity.

The bottom layer of the engine (:mod:`blockbackup.block.block_copy`): the copy methods,
the background pass and the guest path all read and change this state, and none of it
awaits, so each change is one step of the event loop.

- ``copy_bitmap``: one bit per cluster, set = "still to copy". A region is *claimed* by
  clearing its bits and registering it in ``reqs`` (the in-flight list) in one step, so
  nothing else can copy it; a failed or abandoned copy sets its bits again. This keeps the
  bitmap exact at every await: cancel, then start again, is resume.
- ``reqs``: the in-flight copies. Whoever needs a cluster that is in flight waits for it,
  then looks again (the copy may have failed). Each cluster is copied exactly once, by
  whoever claims it first: the background loop or a guest write.
- copy tasks are owned here (``_tasks``), never fire-and-forget.
- when guests last wrote and last needed a copy: the background backs off from guests
  that need copies, and chunks start writeback only while guests are not writing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from blockbackup.block.bitmap import Bitmap
from blockbackup.block.block_copy import tunables
from blockbackup.block.reqlist import ReqList, Request

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode

NO_CLUSTER_INFO_WARNING = (
    "warning: The target block device doesn't provide information about the block size and "
    "it doesn't have a backing file. The default block size of 65536 bytes is used. If the "
    "actual block size of the target exceeds this default, the backup may be unusable"
)


def backup_cluster_size(
    target: BlockNode, min_cluster_size: int = 0, warn: Callable[[str], None] | None = None
) -> int:
    """QEMU's rule: the largest of 64 KiB, ``min_cluster_size`` and the target's cluster size.

    A target with no cluster information and no backing file gets a warning (it might have
    a larger block size that a partial-cluster copy would corrupt).
    """
    minimum = max(tunables.MIN_CLUSTER_SIZE, min_cluster_size)
    cluster = target.cluster_size
    if cluster is None:
        if target.backing() is None and warn is not None:
            warn(NO_CLUSTER_INFO_WARNING)
        return minimum
    return max(minimum, cluster)


class CopyState:
    """The to-copy bitmap, the in-flight list, progress and the copy tasks of one engine."""

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        cluster_size: int,
        *,
        to_copy: Bitmap | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        if to_copy is None:
            to_copy = Bitmap(source.size, cluster_size)
            to_copy.fill()
        elif to_copy.granularity != cluster_size:
            converted = Bitmap(source.size, cluster_size)
            converted.merge(to_copy)
            to_copy = converted
        self.copy_bitmap = to_copy
        self.reqs = ReqList()
        self.bytes_done = 0
        self.bytes_skipped = 0
        #: Bytes of data (not zeroes) written to the target.
        self.data_copied = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._guest_copies = 0
        self._guests_idle = asyncio.Event()
        self._guests_idle.set()
        #: ``time.monotonic()`` when a guest write last needed a copy, and last came by.
        self._last_guest_copy = -tunables.GUEST_RECENT
        self._last_guest_write = -tunables.GUEST_RECENT
        #: Called whenever a region is done or skipped (progress reporting).
        self.on_progress: Callable[[], None] | None = None
        #: Called with (offset, length) when a region's T0 content is on the target, before
        #: its claim is released (so whoever waited for the claim sees it done).
        self.on_copied: Callable[[int, int], None] | None = None

    # -- progress ----------------------------------------------------------------------------

    @property
    def bytes_remaining(self) -> int:
        """Bytes still to copy: dirty in the bitmap or in flight."""
        return self.copy_bitmap.dirty_bytes() + self.reqs.bytes_in_flight

    @property
    def guest_copies_active(self) -> int:
        return self._guest_copies

    # -- claiming ----------------------------------------------------------------------------

    def _claim(self, offset: int, length: int) -> Request:
        self.copy_bitmap.reset(offset, length)
        return self.reqs.add(offset, length)

    async def reset(self, offset: int, length: int) -> None:
        """Never copy the clusters of ``[offset, offset+length)`` (cluster-aligned).

        Returns when none of them is dirty or in flight (an in-flight copy may fail and
        set its bits again: they are cleared again once it is over).
        """
        while True:
            self.copy_bitmap.reset(offset, length)
            conflict = self.reqs.find_conflict(offset, length)
            if conflict is None:
                return
            await conflict.wait()

    def _cluster_range(self, offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % self.cluster_size
        end = min(-(-(offset + length) // self.cluster_size) * self.cluster_size, self.source.size)
        return start, end

    def needs_copy(self, offset: int, length: int) -> bool:
        """Whether a guest write of this range must wait for a copy (``admit_write``).

        False when every cluster it touches is copied and none is in flight: the write may
        go ahead without awaiting anything. Counts as a guest write either way.
        """
        self._last_guest_write = time.monotonic()
        start, end = self._cluster_range(offset, length)
        if start >= end:
            return False
        return (
            self.copy_bitmap.next_dirty_area(start, end, end - start) is not None
            or self.reqs.find_conflict(start, end - start) is not None
        )

    # -- copy tasks --------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(self, tasks: set[asyncio.Task[None]]) -> None:
        """Wait for ``tasks`` even if we are being cancelled; re-raise the cancellation after."""
        cancelled = False
        while tasks:
            try:
                await asyncio.wait(set(tasks))
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
