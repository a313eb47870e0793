"""The L2 table cache: a bounded LRU of L2 tables, written back in dependency order.

A dirty L2 table may reference clusters allocated since the last metadata flush, so before
any L2 table reaches the disk the refcount updates are flushed (``before_write``). Tables
are kept as arrays of host-order integers.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from blockbackup.block.qcow2.fileio import ImageFile

_SWAP = sys.byteorder == "little"


def decode_table(raw: bytes) -> array[int]:
    """Big-endian u64 entries to an array of ints."""
    table = array("Q")
    table.frombytes(raw)
    if _SWAP:
        table.byteswap()
    return table


def encode_table(table: array[int]) -> bytes:
    """An array of ints to big-endian u64 entries."""
    if not _SWAP:
        return table.tobytes()
    out = array("Q", table)
    out.byteswap()
    return out.tobytes()


class L2Cache:
    """Bounded write-back cache of L2 tables keyed by host offset."""

    def __init__(
        self,
        file: ImageFile,
        cluster_size: int,
        max_tables: int,
        before_write: Callable[[], Awaitable[object]],
    ) -> None:
        self.file = file
        self.cs = cluster_size
        self.max_tables = max(2, max_tables)
        self.before_write = before_write
        self.tables: OrderedDict[int, array[int]] = OrderedDict()
        self.dirty: set[int] = set()
        #: L2 tables were written since the last file flush.
        self.unsynced = False

    def __contains__(self, offset: int) -> bool:
        return offset in self.tables

    def cached(self, offset: int) -> array[int] | None:
        """The table at ``offset`` if it is in the cache (no I/O: the write fast path)."""
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
        return table

    async def get(self, offset: int) -> array[int]:
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table
        table = decode_table(await self.file.read(offset, self.cs))
        await self._insert(offset, table)
        return table

    async def new(self, offset: int) -> array[int]:
        """A fresh all-unallocated table at ``offset`` (dirty)."""
        table = array("Q", bytes(self.cs))
        self.dirty.add(offset)
        await self._insert(offset, table)
        return table

    def mark_dirty(self, offset: int, table: array[int]) -> None:
        """Record a change to ``table`` (re-adding it if it was evicted meanwhile)."""
        self.tables[offset] = table
        self.tables.move_to_end(offset)
        self.dirty.add(offset)

    async def _insert(self, offset: int, table: array[int]) -> None:
        self.tables[offset] = table
        while len(self.tables) > self.max_tables:
            victim = next(iter(self.tables))
            if victim == offset:
                break
            if victim in self.dirty:
                await self.before_write()
                await self._write(victim)
            del self.tables[victim]

    async def _write(self, offset: int) -> None:
        await self.file.write(offset, encode_table(self.tables[offset]))
        self.dirty.discard(offset)
        self.unsynced = True

    async def flush(self) -> bool:
        """Write every dirty table (after the refcounts). True if anything was written."""
        if not self.dirty:
            return False
        await self.before_write()
        for offset in sorted(self.dirty):
            await self._write(offset)
        return True
