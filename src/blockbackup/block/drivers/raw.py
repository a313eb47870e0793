"""``raw``: the format driver for raw images, optionally a window (``offset``/``size``) of
its child, so that option dicts written for qemu-storage-daemon work unchanged.

Without a window, raw is the whole child and resizes with it; a window has a fixed size."""

from __future__ import annotations

import errno
from collections.abc import Coroutine
from typing import Any, ClassVar

from blockbackup.block.driver import (
    BlockDriver,
    Buffer,
    Extent,
    Limits,
    WriteFlags,
    io_error,
    register,
)
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import ChildRole
from blockbackup.errors import BlockBackupError


@register
class RawDriver(BlockDriver):
    """Raw format: bytes of the child at a fixed offset."""

    driver_name: ClassVar[str] = "raw"

    def __init__(
        self, node: BlockNode, child: BlockNode, offset: int, size: int, window: bool = False
    ) -> None:
        super().__init__(node)
        self.child = child
        self.offset = offset
        self._size = size
        #: ``offset`` or ``size`` was given: the node is a fixed window of its child.
        self.window = window or offset != 0
        limits = child.limits
        self.limits = Limits(limits.request_alignment, limits.max_transfer, limits.cluster_size)

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> RawDriver:
        child = await opts.child("file")
        offset = opts.int("offset", 0)
        size = opts.int("size", None)
        window = offset != 0 or size is not None
        # As in QEMU: the whole file is shown unchanged (its users' permissions pass
        # through, write shared as they share it); a window stores data in part of it.
        role = ChildRole.DATA if window else ChildRole.FILTERED
        node.add_child("file", child, role | ChildRole.PRIMARY)
        if offset < 0:
            raise BlockBackupError("offset cannot be negative")
        if size is None:
            size = max(0, child.size - offset)
        elif size < 0:
            raise BlockBackupError("size cannot be negative")
        if offset + size > child.size:
            raise BlockBackupError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal "
                f"to the  actual size of the containing file ({child.size})"
            )
        align = child.limits.request_alignment
        if offset % align or (size % align and offset + size != child.size):
            raise BlockBackupError(f"offset and size must be multiples of {align}")
        return cls(node, child, offset, size, window)

    @property
    def size(self) -> int:
        return self._size

    # The window's offset is added once per request kind: each request is one call to
    # the child's admission, inline or awaited (read / write await the same call).

    def submit_read(
        self, offset: int, length: int, into: memoryview | None = None
    ) -> Buffer | Coroutine[Any, Any, Buffer]:
        return self.child.submit_read(self.offset + offset, length, into)

    def submit_write(
        self, offset: int, data: Buffer, flags: WriteFlags
    ) -> Coroutine[Any, Any, None] | None:
        return self.child.submit_write(self.offset + offset, data, flags)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self.child.write_zeroes(self.offset + offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self.child.discard(self.offset + offset, length)

    async def truncate(self, size: int) -> None:
        if self.window:
            raise io_error(
                errno.ENOTSUP, f"raw node {self.node.name} with offset/size cannot be resized"
            )
        await self.child.truncate(size)
        self._size = size

    async def flush(self) -> None:
        await self.child.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        extent = await self.child.block_status(self.offset + offset, length)
        return Extent(offset, extent.length, extent.status)

    async def drop_cache(self, offset: int, length: int) -> None:
        await self.child.drop_cache(self.offset + offset, length)

    def early_writeback(self) -> bool:
        return self.child.early_writeback()

    def fd_map(self, offset: int) -> tuple[int, int] | None:
        return self.child.fd_map(self.offset + offset)

    def can_compress(self) -> bool:
        return False
