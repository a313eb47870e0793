"""Access to the image file (the ``file`` child node) with bounds checks and growth.

Every byte the qcow2 driver reads or writes in the image goes through :class:`ImageFile`,
which refuses offsets a hostile image could use to reach past the end of the file, and
grows the file (through :meth:`BlockNode.truncate`) when clusters are allocated past its
end. It grows in large steps, so that allocating writes do not cost a resize each, and
gives the unused tail back on close.
"""

from __future__ import annotations

import asyncio
import errno

from blockbackup.block.driver import io_error
from blockbackup.block.node import BlockNode

Buffer = bytes | bytearray | memoryview

#: Growth step: at least this much, or 1/8 of the file, whichever is larger.
GROW_MIN = 1 << 20
GROW_ALIGN = 64 << 10


class ImageFile:
    """The qcow2 file child, seen as a bounded, growable byte store."""

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        #: Bytes of the file that exist (the node's size, which grows as we allocate).
        self.size = node.size
        self.opened_size = node.size
        #: Every byte at or past this offset reads as zeroes: it lies past the end of the
        #: file at open time and nothing was written there since (growth zero-fills).
        self.zero_from = node.size
        self._grow_lock = asyncio.Lock()

    async def read(self, offset: int, length: int) -> bytes:
        """Read metadata or data that must lie inside the file."""
        return bytes(await self.read_data(offset, length))

    async def read_data(self, offset: int, length: int) -> Buffer:
        """Like :meth:`read`, without copying the buffer (guest data on the read path)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise io_error(
                errno.EIO,
                f"qcow2: read of {length} bytes at {offset} past the end of the image file",
            )
        if length == 0:
            return b""
        return await self.node.read(offset, length)

    async def read_clamped(self, offset: int, length: int) -> bytes:
        """Read, with the part past the end of the file as zeroes (compressed tails)."""
        if offset >= self.size:
            raise io_error(errno.EIO, f"qcow2: offset {offset} past the end of the image file")
        n = min(length, self.size - offset)
        data = await self.read(offset, n)
        return data + bytes(length - n)

    def reads_zero(self, offset: int) -> bool:
        """Whether every byte from ``offset`` on is known to read as zeroes."""
        return offset >= self.zero_from

    async def ensure_size(self, end: int) -> None:
        """Make the file at least ``end`` bytes long (new clusters lie inside the file)."""
        if end > self.size:
            await self._grow(end)

    async def write(self, offset: int, data: Buffer) -> None:
        end = offset + len(data)
        if end > self.size:
            await self._grow(end)
        self.zero_from = max(self.zero_from, end)
        await self.node.write(offset, data)

    async def _grow(self, end: int) -> None:
        """Make the file at least ``end`` bytes long, in one large step if possible."""
        async with self._grow_lock:  # concurrent growers must never shrink each other
            current = self.node.size
            if end > current:
                await self._grow_step(current, end)
            self.size = self.node.size

    async def _grow_step(self, current: int, end: int) -> None:
        step = max(end, current + max(GROW_MIN, current // 8))
        step = -(-step // GROW_ALIGN) * GROW_ALIGN
        try:
            await self.node.truncate(step)
        except OSError as err:
            if err.errno != errno.ENOSPC or step == end:
                raise
            await self.node.truncate(end)  # a device with room for the write, not the step

    async def trim(self, used_end: int) -> None:
        """Give back the growth slack past ``used_end`` (never below the size at open)."""
        keep = max(used_end, self.opened_size, self.zero_from)
        if self.node.size <= keep:
            return
        try:
            await self.node.truncate(keep)
        except OSError:
            return  # slack past the last cluster is harmless: keep it
        self.size = self.node.size

    async def flush(self) -> None:
        await self.node.flush()

    async def discard(self, offset: int, length: int) -> None:
        if offset + length <= self.size:
            await self.node.discard(offset, length)
