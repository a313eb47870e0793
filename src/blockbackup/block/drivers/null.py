"""``null-co``: a disk that discards writes and reads zeroes, for tests and benchmarks."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from blockbackup.block.driver import BlockDriver, Extent, Status, WriteFlags, register
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.errors import BlockBackupError


@register
class NullDriver(BlockDriver):
    """Reads zeroes, accepts and drops writes; optional per-request latency."""

    driver_name: ClassVar[str] = "null-co"

    def __init__(self, node: BlockNode, size: int, read_zeroes: bool, latency_ns: int) -> None:
        super().__init__(node)
        self._size = size
        self.read_zeroes = read_zeroes
        self._latency = latency_ns / 1e9

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> NullDriver:
        size = opts.int("size", 1 << 30)
        if size < 0:
            raise BlockBackupError("size must be non-negative")
        read_zeroes = opts.bool("read-zeroes", False)
        latency = opts.int("latency-ns", 0)
        return cls(node, size, read_zeroes, latency)

    @property
    def size(self) -> int:
        return self._size

    async def _delay(self) -> None:
        if self._latency:
            await asyncio.sleep(self._latency)

    async def read(self, offset: int, length: int) -> bytes:
        await self._delay()
        return bytes(length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        await self._delay()

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> Extent:
        status = Status.ALLOCATED | (Status.ZERO if self.read_zeroes else Status.DATA)
        return Extent(offset, length, status)
