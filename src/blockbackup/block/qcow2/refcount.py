"""Host cluster reference counts: the refcount table, a cache of refcount blocks, and
cluster allocation (growing the table and creating refcount blocks as the image grows).

Ordering rules (what keeps a crash from corrupting the image):

- a new refcount block is written and flushed before the table entry naming it;
- dirty refcount blocks and table entries are written and flushed by :meth:`flush`, which
  the driver calls before writing any L2 table, so a cluster is never referenced on disk
  before its refcount is;
- refcounts are only *decreased* by the driver after the references to the cluster are
  durably gone, so a decrement may reach the disk at any time;
- an allocated cluster always lies inside the file (the file grows before allocation).
"""

from __future__ import annotations

import errno
import heapq
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from blockbackup.block.driver import io_error
from blockbackup.block.qcow2.fileio import ImageFile
from blockbackup.block.qcow2.header import MAX_HOST_OFFSET, MAX_REFTABLE_BYTES

OFFSET_MASK = 0x00FFFFFFFFFFFE00


#: Whole-byte refcount widths, read and written in place (no slice per access: the
#: allocating write path reads and sets a refcount per cluster).
_WIDE = {
    8: struct.Struct(">B"),
    16: struct.Struct(">H"),
    32: struct.Struct(">I"),
    64: struct.Struct(">Q"),
}


def get_refcount(blk: bytes | bytearray, i: int, bits: int) -> int:
    """Entry ``i`` of a refcount block with ``bits``-wide entries."""
    wide = _WIDE.get(bits)
    if wide is not None:
        value: int = wide.unpack_from(blk, i * wide.size)[0]
        return value
    pos = i * bits
    return (blk[pos >> 3] >> (pos & 7)) & ((1 << bits) - 1)


def put_refcount(blk: bytearray, i: int, value: int, bits: int) -> None:
    """Set entry ``i`` of a refcount block (sub-byte entries: bit 0 is the LSB)."""
    wide = _WIDE.get(bits)
    if wide is not None:
        wide.pack_into(blk, i * wide.size, value)
        return
    pos = i * bits
    shift = pos & 7
    mask = ((1 << bits) - 1) << shift
    blk[pos >> 3] = (blk[pos >> 3] & ~mask) | (value << shift)


def _eio(text: str) -> OSError:
    return io_error(errno.EIO, f"qcow2: {text}")


class Refcounts:
    """Refcount table + block cache + allocator for one image."""

    def __init__(
        self,
        file: ImageFile,
        cluster_bits: int,
        refcount_order: int,
        table: list[int],
        table_offset: int,
        cache_blocks: int,
        on_table_moved: Callable[[int, int], Awaitable[None]],
        discard: bool = False,
    ) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max_refcount = (1 << self.bits) - 1
        #: Entries per refcount block.
        self.per_block = self.cs * 8 // self.bits
        self.table = table
        self.table_offset = table_offset
        self.table_dirty: set[int] = set()
        self.cache: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.cache_blocks = max(4, cache_blocks)
        self.on_table_moved = on_table_moved
        self.discard_freed = discard
        self.next_free = -(-file.size // self.cs)
        self._free_heap: list[int] = []
        self._free_set: set[int] = set()

    @classmethod
    async def load(
        cls,
        file: ImageFile,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        cache_blocks: int,
        on_table_moved: Callable[[int, int], Awaitable[None]],
        discard: bool = False,
    ) -> Refcounts:
        raw = await file.read(table_offset, table_clusters << cluster_bits)
        table = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        return cls(
            file,
            cluster_bits,
            refcount_order,
            table,
            table_offset,
            cache_blocks,
            on_table_moved,
            discard,
        )

    # -- blocks --------------------------------------------------------------------------------

    def _block_offset(self, index: int) -> int:
        entry = self.table[index]
        offset = entry & ~0x1FF
        if (
            entry & 0x1FF
            or offset % self.cs
            or offset + self.cs > max(self.file.size, self.next_free * self.cs)
        ):
            raise _eio(f"refcount block {index} has an invalid offset {entry:#x}")
        return offset

    async def _block(self, index: int) -> bytearray | None:
        """Refcount block ``index`` (None when not allocated: all its refcounts are 0)."""
        blk = self.cache.get(index)
        if blk is not None:
            self.cache.move_to_end(index)
            return blk
        if index >= len(self.table) or self.table[index] == 0:
            return None
        offset = self._block_offset(index)
        if offset + self.cs > self.file.size:
            blk = bytearray(self.cs)  # allocated by us, not written yet: never happens
        else:
            blk = bytearray(await self.file.read(offset, self.cs))
        await self._insert(index, blk)
        return blk

    async def _insert(self, index: int, blk: bytearray) -> None:
        self.cache[index] = blk
        while len(self.cache) > self.cache_blocks:
            victim, vblk = next(iter(self.cache.items()))
            if victim == index:
                break
            if victim in self.dirty:
                await self.file.write(self._block_offset(victim), vblk)
                self.dirty.discard(victim)
            del self.cache[victim]

    def _get(self, blk: bytearray, i: int) -> int:
        return get_refcount(blk, i, self.bits)

    def _put(self, blk: bytearray, i: int, value: int) -> None:
        put_refcount(blk, i, value, self.bits)

    async def get(self, cluster: int) -> int:
        blk = await self._block(cluster // self.per_block)
        return 0 if blk is None else self._get(blk, cluster % self.per_block)

    async def _set(self, cluster: int, value: int) -> None:
        index = cluster // self.per_block
        blk = await self._block(index)
        if blk is None:
            raise _eio(f"no refcount block for cluster {cluster}")
        self._put(blk, cluster % self.per_block, value)
        self.dirty.add(index)

    # -- public updates ------------------------------------------------------------------------

    async def increment(self, cluster: int) -> None:
        """One more reference to a cluster that is already in use (compressed sharing)."""
        value = await self.get(cluster)
        if value >= self.max_refcount:
            raise _eio(f"refcount overflow for cluster {cluster}")
        await self._set(cluster, value + 1)

    async def decrement(self, cluster: int) -> None:
        """Drop one reference; a cluster that reaches 0 becomes reusable."""
        value = await self.get(cluster)
        if value == 0:
            raise _eio(f"refcount underflow for cluster {cluster}")
        await self._set(cluster, value - 1)
        if value == 1:
            if self.discard_freed:
                await self.file.discard(cluster * self.cs, self.cs)
            if cluster < self.next_free and cluster not in self._free_set:
                self._free_set.add(cluster)
                heapq.heappush(self._free_heap, cluster)

    # -- allocation ----------------------------------------------------------------------------

    def try_alloc(self, n: int = 1) -> int | None:
        """:meth:`alloc` when it needs no I/O, else None (and nothing changed).

        No I/O means: the refcount blocks involved are cached, the file is already big
        enough and the clusters at ``next_free`` are free. The allocating write path calls
        this synchronously, so it needs neither the metadata lock nor an await.
        """
        cache, per, bits = self.cache, self.per_block, self.bits
        if n == 1:
            heap = self._free_heap
            while heap:
                c = heap[0]
                blk = cache.get(c // per)
                if blk is None:
                    return None
                heapq.heappop(heap)
                self._free_set.discard(c)
                if get_refcount(blk, c % per, bits) == 0:
                    put_refcount(blk, c % per, 1, bits)
                    self.dirty.add(c // per)
                    cache.move_to_end(c // per)
                    return c * self.cs
        start = self.next_free
        end = start + n
        if end * self.cs > self.file.size or end * self.cs > MAX_HOST_OFFSET:
            return None
        if n == 1:  # the common case (small writes), without the loops below
            index, i = divmod(start, per)
            blk = cache.get(index)
            if blk is None or get_refcount(blk, i, bits):
                return None
            put_refcount(blk, i, 1, bits)
            self.dirty.add(index)
            cache.move_to_end(index)
            self.next_free = end
            return start * self.cs
        for c in range(start, end):
            blk = cache.get(c // per)
            if blk is None or get_refcount(blk, c % per, bits):
                return None
        for c in range(start, end):
            index = c // per
            put_refcount(cache[index], c % per, 1, bits)
            self.dirty.add(index)
        cache.move_to_end((end - 1) // per)
        self.next_free = end
        return start * self.cs

    async def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); return the host offset."""
        if n == 1:
            while self._free_heap:
                c = heapq.heappop(self._free_heap)
                self._free_set.discard(c)
                if await self.get(c) == 0:
                    await self._set(c, 1)
                    return c * self.cs
        while True:
            start = self.next_free
            ok = True
            for c in range(start, start + n):
                index = c // self.per_block
                if index >= len(self.table):
                    await self._grow_table(index + 1)
                    ok = False
                    break
                if self.table[index] == 0:
                    await self._create_block(index, c)
                    ok = False
                    break
                if await self.get(c) != 0:
                    self.next_free = c + 1
                    ok = False
                    break
            if not ok:
                continue
            if (start + n) * self.cs > MAX_HOST_OFFSET:
                raise io_error(errno.ENOSPC, "qcow2: image file too large")
            # Allocated clusters always lie inside the file: grow it first, so that a file
            # that cannot grow fails the allocation, not a later metadata write.
            await self.file.ensure_size((start + n) * self.cs)
            for c in range(start, start + n):
                await self._set(c, 1)
            self.next_free = start + n
            return start * self.cs

    async def _create_block(self, index: int, at: int) -> None:
        """Create refcount block ``index`` in cluster ``at`` (a cluster it covers)."""
        await self.file.ensure_size((at + 1) * self.cs)
        blk = bytearray(self.cs)
        self.table[index] = at * self.cs
        self.table_dirty.add(index)
        self.next_free = max(self.next_free, at + 1)
        self.dirty.add(index)
        await self._insert(index, blk)
        self._put(blk, at % self.per_block, 1)

    async def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger place at the end of the image."""
        cs, per = self.cs, self.per_block
        per_cluster = cs // 8
        new_len = max(min_entries, len(self.table) * 2)
        while True:
            new_len = -(-new_len // per_cluster) * per_cluster
            if new_len * 8 > MAX_REFTABLE_BYTES:
                raise io_error(errno.EFBIG, "qcow2: reference count table too large")
            tclusters = new_len * 8 // cs
            start = self.next_free
            need: list[int] = []
            while True:
                end = start + tclusters + len(need)
                first, last = start // per, (end - 1) // per
                fresh = [
                    i for i in range(first, last + 1) if i >= len(self.table) or self.table[i] == 0
                ]
                if len(fresh) == len(need):
                    break
                need = fresh
            if need and max(need) >= new_len:
                new_len = max(need) + 1
                continue
            busy = None
            for c in range(start, end):
                if await self.get(c):
                    busy = c
            if busy is not None:
                self.next_free = busy + 1
                continue
            break
        old_offset, old_clusters = self.table_offset, -(-len(self.table) * 8 // cs)
        table = self.table + [0] * (new_len - len(self.table))
        self.table = table
        for j, index in enumerate(need):
            table[index] = (start + tclusters + j) * cs
            self.dirty.add(index)
            await self._insert(index, bytearray(cs))
        self.next_free = end
        for c in range(start, end):
            await self._set(c, 1)
        await self._write_blocks()
        await self.file.flush()
        raw = struct.pack(f">{new_len}Q", *table)
        await self.file.write(start * cs, raw)
        await self.file.flush()
        self.table_offset = start * cs
        self.table_dirty.clear()
        await self.on_table_moved(self.table_offset, tclusters)
        for c in range(old_offset // cs, old_offset // cs + old_clusters):
            await self.decrement(c)

    # -- persistence ---------------------------------------------------------------------------

    async def _write_blocks(self) -> bool:
        wrote = False
        for index in sorted(self.dirty):
            blk = self.cache.get(index)
            if blk is not None:
                await self.file.write(self._block_offset(index), blk)
                wrote = True
        self.dirty.clear()
        return wrote

    async def flush(self) -> bool:
        """Write dirty blocks, flush, write dirty table entries, flush. True if anything."""
        wrote = await self._write_blocks()
        if wrote:
            await self.file.flush()
        if self.table_dirty:
            for index in sorted(self.table_dirty):
                await self.file.write(
                    self.table_offset + index * 8, struct.pack(">Q", self.table[index])
                )
            self.table_dirty.clear()
            await self.file.flush()
            wrote = True
        return wrote

    @property
    def is_dirty(self) -> bool:
        return bool(self.dirty or self.table_dirty)
