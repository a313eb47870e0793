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

from blockbackup.block.driver import BlockDriver, Extent, WriteFlags, io_error, register
from blockbackup.block.filters.copy_before_write import CopyBeforeWriteDriver
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import ChildRole


@register
class SnapshotAccessDriver(BlockDriver):
    """Read-only view of the point in time kept by the copy-before-write node ``file``."""

    driver_name: ClassVar[str] = "snapshot-access"

    def __init__(self, node: BlockNode, child: BlockNode) -> None:
        super().__init__(node)
        self.child = child

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> SnapshotAccessDriver:
        child = await opts.child("file")
        node.add_child("file", child, ChildRole.VIEW | ChildRole.PRIMARY)
        return cls(node, child)

    def _cbw(self) -> CopyBeforeWriteDriver:
        driver = self.child.driver
        if not isinstance(driver, CopyBeforeWriteDriver):
            raise io_error(errno.ENOTSUP, f"{self.child.name} is not a copy-before-write node")
        return driver

    @property
    def size(self) -> int:
        return self.child.size

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self._cbw().snapshot_read(offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        raise io_error(errno.ENOTSUP, "snapshot-access is read-only")

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        raise io_error(errno.ENOTSUP, "snapshot-access is read-only")

    async def discard(self, offset: int, length: int) -> None:
        await self._cbw().snapshot_discard(offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._cbw().snapshot_block_status(offset, length)
