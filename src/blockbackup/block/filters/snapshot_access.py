"""``snapshot-access``: a node showing a copy-before-write filter's point-in-time view.

Why a node of its own: image fleecing wants the frozen image as something that can be
exported over NBD or used as a backup source (push backup with fleecing), while the
guest keeps writing through the copy-before-write node. This driver forwards to the
filter's snapshot API (:class:`~blockbackup.block.filters.copy_before_write.
CopyBeforeWriteDriver`): reads and block status of the view, and discard, which frees the
temporary copy and ends copy-before-write for that area (a backup from this node with
``discard-source`` empties the temporary image as it goes). Writes are not supported.

As in QEMU, ``file`` may be any node; I/O then fails with ENOTSUP.
"""

from __future__ import annotations

import errno
from typing import ClassVar

from blockbackup.block.driver import Extent, Limits, WriteFlags, io_error, register
from blockbackup.block.filters.copy_before_write import CopyBeforeWriteDriver
from blockbackup.block.filters.forwarding import Buffer, FilterDriver
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import ChildRole


def _read_only() -> OSError:
    return io_error(errno.ENOTSUP, "snapshot-access is read-only")


@register
class SnapshotAccessDriver(FilterDriver):
    """Read-only view of the point in time kept by the copy-before-write node ``file``.

    Everything that touches data goes to the filter's snapshot API; only the size is
    forwarded as it is. Not a filter for graph walks (``is_filter``), as in QEMU:
    its data is not its child's data.
    """

    driver_name: ClassVar[str] = "snapshot-access"
    is_filter: ClassVar[bool] = False

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> SnapshotAccessDriver:
        child = await opts.child("file")
        node.add_child("file", child, ChildRole.VIEW | ChildRole.PRIMARY)
        # Byte-granular, as the snapshot API is; not the source's alignment.
        return cls(node, child, Limits())

    def _cbw(self) -> CopyBeforeWriteDriver:
        driver = self.child.driver
        if not isinstance(driver, CopyBeforeWriteDriver):
            raise io_error(errno.ENOTSUP, f"{self.child.name} is not a copy-before-write node")
        return driver

    async def read(self, offset: int, length: int) -> Buffer:
        return await self._cbw().snapshot_read(offset, length)

    async def write(self, offset: int, data: Buffer, flags: WriteFlags) -> None:
        raise _read_only()

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        raise _read_only()

    async def truncate(self, size: int) -> None:
        raise _read_only()

    async def discard(self, offset: int, length: int) -> None:
        await self._cbw().snapshot_discard(offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._cbw().snapshot_block_status(offset, length)

    async def flush(self) -> None:
        """Nothing: nothing is written through this node (flushing the filter would flush
        the guest's source for a reader of the view)."""

    async def drop_cache(self, offset: int, length: int) -> None:
        """Nothing: the view's data is the guest's source (and the temporary image); a
        reader of the view must not evict what the guest reads."""

    def early_writeback(self) -> bool:
        return False  # nothing is written through this node
