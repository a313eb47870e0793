"""Access to the image file (the ``file`` child node) with bounds checks and growth.

Every byte the qcow2 driver reads or writes in the image goes through :class:`ImageFile`,
which refuses offsets a hostile image could use to reach past the end of the file, and
lets the image grow when clusters are allocated past the current end.
"""

from __future__ import annotations

import errno

from blockbackup.block.driver import io_error
from blockbackup.block.node import BlockNode

Buffer = bytes | bytearray | memoryview


def _allow_growth(node: BlockNode, end: int) -> None:
    """Let ``node`` take writes up to ``end``.

    The request layer checks every write against the node's size, which the driver
    interface fixes at open time; an image format has to grow its file. Until the driver
    interface has a way to grow a node, this raises the size of a child whose driver keeps
    it in ``_size`` (``file``); a write past the end then extends the file.
    """
    driver = node.driver
    if end <= driver.size:
        return
    if not hasattr(driver, "_size"):
        raise io_error(errno.ENOSPC, f"cannot grow {node.name} to {end} bytes")
    driver._size = end
    # A format between us and the protocol (raw) keeps its own size too.
    child = node.children.get("file")
    if child is not None and child is not node:
        _allow_growth(child, end)


class ImageFile:
    """The qcow2 file child, seen as a bounded, growable byte store."""

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        #: Bytes of the file that exist (grows as we write past the end).
        self.size = node.size

    async def read(self, offset: int, length: int) -> bytes:
        """Read metadata or data that must lie inside the file."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise io_error(
                errno.EIO,
                f"qcow2: read of {length} bytes at {offset} past the end of the image file",
            )
        if length == 0:
            return b""
        return bytes(await self.node.read(offset, length))

    async def read_clamped(self, offset: int, length: int) -> bytes:
        """Read, with the part past the end of the file as zeroes (compressed tails)."""
        if offset >= self.size:
            raise io_error(errno.EIO, f"qcow2: offset {offset} past the end of the image file")
        n = min(length, self.size - offset)
        data = await self.read(offset, n)
        return data + bytes(length - n)

    async def write(self, offset: int, data: Buffer) -> None:
        end = offset + len(data)
        if end > self.node.size:
            _allow_growth(self.node, end)
        await self.node.write(offset, data)
        self.size = max(self.size, end)

    async def flush(self) -> None:
        await self.node.flush()

    async def discard(self, offset: int, length: int) -> None:
        if offset + length <= self.size:
            await self.node.discard(offset, length)
