"""``qcow2``: the format driver for QEMU's copy-on-write image format.

Reads and writes v2 and v3 images through the ``file`` child, with backing chains,
zero clusters, compressed clusters and cluster allocation.

Crash safety (no lazy refcounts, the dirty bit is never needed): metadata reaches the disk
in dependency order, with a flush of the file between dependent steps, so that a crash at
any point leaks clusters at worst:

1. data is written into newly allocated clusters before the L2 entry naming them changes
   (in memory, under the metadata lock);
2. refcount blocks (then the refcount table) are written and flushed before any L2 table
   that may reference newly allocated clusters is written;
3. L2 tables are written and flushed before an L1 entry naming a new L2 table is written;
4. clusters that lose their last reference (overwrite, discard, zeroing) are only
   decremented after the L2 tables without the reference are flushed.

Metadata changes are serialised by one asyncio lock; reads and in-place writes of
allocated clusters run outside it. A write whose metadata is all cached (L2 table,
refcount blocks, file already grown) maps, allocates and updates its L2 entries in
synchronous sections instead, taken only while nobody holds the lock: with no await inside,
such a section is as exclusive as a locked one, and it changes only cached tables, so
the ordering above (kept by flush and cache eviction, which run under the lock) holds.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from blockbackup.block.bitmap_store.image import FreshBitmap, StoredEntry
from blockbackup.block.driver import (
    BlockDriver,
    Extent,
    Limits,
    Status,
    WriteFlags,
    io_error,
    register,
)
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import ChildRole
from blockbackup.block.qcow2 import bitmaps
from blockbackup.block.qcow2.compress import compress, decompress
from blockbackup.block.qcow2.fileio import Buffer, ImageFile
from blockbackup.block.qcow2.header import (
    AUTOCLEAR_KNOWN,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_HOST_OFFSET,
    Header,
    parse_header,
)
from blockbackup.block.qcow2.refcount import Refcounts
from blockbackup.block.qcow2.tables import L2Cache, decode_table
from blockbackup.errors import BlockBackupError

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
L2_RESERVED = 0x3F000000000001FE

UNALLOC, ZERO, NORMAL, COMPRESSED_KIND = range(4)

#: Real paths of the images whose implicit backing files are being opened (loop check).
_opening: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "qcow2_opening", default=()
)

DEFAULT_L2_CACHE = 32 << 20
MAX_CHAIN_DEPTH = 256


def _realpath(path: str) -> str:
    """Canonical path for the loop check (a few stat calls at open time only)."""
    return os.path.realpath(path)


def _eio(text: str) -> OSError:
    return io_error(errno.EIO, f"qcow2: {text}")


@dataclass(slots=True)
class Mapping:
    """A run of guest bytes with one kind of mapping (within one L2 table)."""

    kind: int
    length: int
    #: Host offset of the first byte (NORMAL), or the raw L2 entry (COMPRESSED).
    host: int
    copied: bool = False


@dataclass(slots=True, eq=False)
class _Allocation:
    """An allocating write between cluster allocation and its L2 update."""

    first: int  # first and last guest cluster
    last: int
    l2_offset: int
    l2_index: int
    host: int  # host offset of the first new cluster
    write_at: int  # where ``data`` goes (zero head clusters on fresh space are skipped)
    data: bytes | bytearray | memoryview
    #: Set when the allocation is finished; made only when some request has to wait.
    done: asyncio.Event | None = None

    async def wait(self) -> None:
        if self.done is None:
            self.done = asyncio.Event()
        await self.done.wait()


@register
class Qcow2Driver(BlockDriver):
    """qcow2 format driver."""

    driver_name: ClassVar[str] = "qcow2"

    def __init__(
        self,
        node: BlockNode,
        file_node: BlockNode,
        image: ImageFile,
        hdr: Header,
        l1: list[int],
        refs: Refcounts,
        l2_tables: int,
    ) -> None:
        super().__init__(node)
        self.file_node = file_node
        self.file = image
        self.hdr = hdr
        self.cs = hdr.cluster_size
        self.cb = hdr.cluster_bits
        self.l2e = hdr.l2_entries
        self.l1 = l1
        self.l1_dirty: set[int] = set()
        self.refs = refs
        self.l2 = L2Cache(image, self.cs, l2_tables, refs.flush)
        self.backing_node: BlockNode | None = None
        self.lock = asyncio.Lock()
        self.pending_frees: list[int] = []
        self._data_in_flight = 0
        self._data_idle = asyncio.Event()
        self._data_idle.set()
        self._allocating: list[_Allocation] = []
        self._cbyte = 0  # next free byte in the current compressed cluster (0: none)
        self._closed = False
        self.limits = Limits(request_alignment=1, max_transfer=0, cluster_size=self.cs)
        csize_bits = self.cb - 8
        self._cshift = 62 - csize_bits
        self._cmask = (1 << csize_bits) - 1
        self._coffmask = (1 << self._cshift) - 1

    # -- open ----------------------------------------------------------------------------------

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> Qcow2Driver:
        file_node = await opts.child("file")
        # Before anything is read: qcow2 owns metadata in its file, so it never shares
        # write or resize of it (another writer is refused here, QEMU's lock error).
        node.add_child("file", file_node, ChildRole.DATA | ChildRole.METADATA | ChildRole.PRIMARY)
        opts.bool("lazy-refcounts", False)
        cache_size = opts.int("cache-size", None)
        l2_cache_size = opts.int("l2-cache-size", None)
        refcount_cache_size = opts.int("refcount-cache-size", None)
        opts.int("cache-clean-interval", 0)
        opts.bool("discard-no-unref", False)
        pass_request = opts.bool("pass-discard-request", False)
        opts.bool("pass-discard-snapshot", True)
        pass_other = opts.bool("pass-discard-other", False)
        overlap = opts.raw("overlap-check", None)
        if overlap is not None and not isinstance(overlap, str | dict):
            raise BlockBackupError(
                "Invalid parameter type for 'overlap-check', expected: string or object"
            )
        if opts.raw("data-file", None) is not None:
            raise BlockBackupError(
                "'data-file' can only be set if the image uses an external data file"
            )
        if opts.raw("encrypt", None) is not None:
            raise BlockBackupError("qcow2: Encrypted images are not supported")
        for key in ("encrypt.format", "encrypt.key-secret"):
            if opts.has(key):
                raise BlockBackupError("qcow2: Encrypted images are not supported")
        for value in (cache_size, l2_cache_size, refcount_cache_size):
            if value is not None and value < 0:
                raise BlockBackupError("Cache size must be a non-negative number")

        image = ImageFile(file_node)
        if image.size < 72:
            raise BlockBackupError("Image is not in qcow2 format")
        first = await image.read(0, min(image.size, 4096))
        if len(first) >= 24 and first[:4] == b"QFI\xfb":
            bits = struct.unpack_from(">I", first, 20)[0]
            if 9 <= bits <= 21 and (1 << bits) > len(first):
                first = await image.read(0, min(image.size, 1 << bits))
        hdr = parse_header(first, image.size)
        writable = not node.read_only
        if writable:
            if hdr.incompatible_features & INCOMPAT_CORRUPT:
                raise BlockBackupError("qcow2: Image is corrupt; cannot be opened read/write")
            if hdr.incompatible_features & INCOMPAT_DIRTY:
                raise BlockBackupError(
                    "qcow2: Image has dirty refcounts (lazy refcounts); "
                    "repair it with 'qemu-img check -r all'"
                )
            if hdr.nb_snapshots:
                raise BlockBackupError(
                    "qcow2: Writing to images with internal snapshots is not supported"
                )

        cs = hdr.cluster_size
        raw_l1 = await image.read(hdr.l1_table_offset, hdr.l1_size * 8)
        l1 = list(decode_table(raw_l1))
        l2_bytes = l2_cache_size if l2_cache_size is not None else cache_size
        if l2_bytes is None:
            covering = -(-hdr.size // cs) * 8
            l2_bytes = min(DEFAULT_L2_CACHE, max(covering, 1 << 20))
        l2_tables = max(4, l2_bytes // cs)
        rc_tables = max(4, (refcount_cache_size or max(l2_bytes // 4, 256 << 10)) // cs)

        holder: list[Qcow2Driver] = []

        async def moved(offset: int, clusters: int) -> None:
            await holder[0]._reftable_moved(offset, clusters)

        refs = await Refcounts.load(
            image,
            hdr.cluster_bits,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            rc_tables,
            moved,
            discard=bool(pass_request or pass_other),
        )
        self = cls(node, file_node, image, hdr, l1, refs, l2_tables)
        holder.append(self)

        await self._open_backing(opts)
        if writable:
            await self._open_writable()
        return self

    async def _open_backing(self, opts: Options) -> None:
        if opts.has("backing"):
            child = await opts.optional_child("backing")
        else:
            opts.raw("backing", None)
            child = await self._open_implicit_backing()
        if child is not None:
            self._check_chain(child)
            self.node.add_child("backing", child, ChildRole.COW)
            self.backing_node = child

    def _check_chain(self, child: BlockNode) -> None:
        seen: set[int] = {id(self.node)}
        node: BlockNode | None = child
        depth = 0
        while node is not None:
            if id(node) in seen:
                raise BlockBackupError("qcow2: Loop in the backing chain")
            seen.add(id(node))
            depth += 1
            node = node.children.get("backing") or (
                node.children.get(node.driver.filtered_role) if node.driver.is_filter else None
            )
        if depth > MAX_CHAIN_DEPTH:
            raise BlockBackupError("qcow2: Backing chain too long")

    def _image_path(self) -> str | None:
        name = getattr(self.file_node.driver, "filename", None)
        return name if isinstance(name, str) else None

    async def _open_implicit_backing(self) -> BlockNode | None:
        name = self.hdr.backing_file
        if name is None:
            return None
        me = self._image_path()
        path = name
        if not os.path.isabs(name) and me is not None:
            path = os.path.join(os.path.dirname(me), name)
        chain = _opening.get()
        mine = _realpath(me) if me is not None else None
        if mine is not None and not chain:
            chain = (mine,)
        target = _realpath(path)
        if target in chain:
            raise BlockBackupError(
                f"qcow2: Loop in the backing chain: '{name}' is already in the chain"
            )
        if len(chain) > MAX_CHAIN_DEPTH:
            raise BlockBackupError("qcow2: Backing chain too long")
        graph = self.node.graph
        token = _opening.set((*chain, target))
        try:
            fmt = self.hdr.backing_format
            file_opts: dict[str, object] = {"driver": "file", "filename": path, "read-only": True}
            if fmt is None:
                probe = await graph.add(file_opts, prefix="backing.file.", implicit=True)
                try:
                    magic = bytes(await probe.read(0, min(4, probe.size)))
                finally:
                    await graph.delete(probe.name)
                fmt = "qcow2" if magic == b"QFI\xfb" else "raw"
            return await graph.add(
                {"driver": fmt, "file": file_opts, "read-only": True},
                prefix="backing.",
                implicit=True,
            )
        except BlockBackupError as err:
            raise BlockBackupError(f"Could not open backing file: {err}") from err
        finally:
            _opening.reset(token)

    async def _open_writable(self) -> None:
        hdr = self.hdr
        autoclear = hdr.autoclear_features
        keep = autoclear & AUTOCLEAR_KNOWN
        # Stored bitmaps are loaded, marked in use and stored again by
        # blockbackup.block.bitmap_store when the graph opens and closes the node.
        if hdr.version >= 3 and keep != autoclear:
            hdr.autoclear_features = keep
            await self.file.write(88, struct.pack(">Q", keep))
            await self.file.flush()

    async def _reftable_moved(self, offset: int, clusters: int) -> None:
        self.hdr.refcount_table_offset = offset
        self.hdr.refcount_table_clusters = clusters
        await self.file.write(48, struct.pack(">QI", offset, clusters))
        await self.file.flush()

    # -- mapping -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.hdr.size

    def can_compress(self) -> bool:
        return True

    def _is_metadata(self, host: int, length: int) -> bool:
        """Whether a data write to ``[host, host+length)`` would hit known metadata."""
        cs = self.cs
        if host < cs:
            return True
        hdr = self.hdr
        spans = (
            (hdr.l1_table_offset, hdr.l1_size * 8),
            (self.refs.table_offset, len(self.refs.table) * 8),
        )
        for start, n in spans:
            if n and host < start + n and start < host + length:
                return True
        first, last = host // cs, (host + length - 1) // cs
        return any(c * cs in self.l2 for c in range(first, last + 1))

    def _l2_offset(self, l1_index: int) -> int:
        entry = self.l1[l1_index]
        offset = entry & L1_OFFSET_MASK
        end = max(self.file.size, self.refs.next_free * self.cs)
        if offset and (offset % self.cs or offset + self.cs > end or entry & 0x7F000000000001FF):
            raise _eio(f"L1 entry {l1_index} has an invalid L2 table offset {entry:#x}")
        return offset

    def _checked_l2_offset(self, l1_index: int) -> int:
        """The L2 table offset of an L1 entry (0: none), EIO if it is invalid."""
        if l1_index >= len(self.l1):
            raise _eio("guest offset beyond the L1 table")
        offset = self._l2_offset(l1_index)
        if offset and (
            offset < self.cs
            or offset == self.hdr.l1_table_offset
            or offset == self.refs.table_offset
        ):
            raise _eio(f"L2 table at {offset:#x} overlaps metadata")
        return offset

    async def _l2_table(self, l1_index: int, alloc: bool) -> tuple[int, array[int]] | None:
        offset = self._checked_l2_offset(l1_index)
        if offset == 0:
            if not alloc:
                return None
            offset = await self.refs.alloc(1)
            table = await self.l2.new(offset)
            self.l1[l1_index] = offset | COPIED
            self.l1_dirty.add(l1_index)
            return offset, table
        if alloc and not self.l1[l1_index] & COPIED:
            if await self.refs.get(offset // self.cs) != 1:
                raise _eio("shared L2 tables (internal snapshots) cannot be written")
            self.l1[l1_index] |= COPIED
            self.l1_dirty.add(l1_index)
        return offset, await self.l2.get(offset)

    def _classify(self, entry: int) -> tuple[int, int, bool]:
        """(kind, host offset or entry, copied) of an L2 entry; EIO for invalid ones."""
        if entry & COMPRESSED:
            return COMPRESSED_KIND, entry, False
        host = entry & L2_OFFSET_MASK
        copied = bool(entry & COPIED)
        if entry & ZERO_FLAG:
            return ZERO, host, copied
        if entry & L2_RESERVED:
            raise _eio(f"L2 entry {entry:#x} has reserved bits set")
        if host == 0:
            if copied:
                raise _eio("L2 entry with host offset 0")
            return UNALLOC, 0, False
        if host % self.cs or host >= self.file.size or host < self.cs:
            raise _eio(
                f"data cluster offset {host:#x} is invalid or past the end of the image file"
            )
        return NORMAL, host, copied

    async def _map(self, offset: int, length: int) -> Mapping:
        """The mapping of the run of bytes starting at ``offset`` (caller holds the lock)."""
        found = await self._l2_table((offset >> self.cb) // self.l2e, alloc=False)
        return self._map_in(None if found is None else found[1], offset, length)

    def _map_in(self, table: array[int] | None, offset: int, length: int) -> Mapping:
        """The mapping of ``offset`` in its L2 table (None: no table, all unallocated)."""
        cs = self.cs
        gc = offset >> self.cb
        l1_index, l2_index = divmod(gc, self.l2e)
        limit = min(offset + length, (l1_index + 1) * self.l2e * cs)
        if table is None:
            return Mapping(UNALLOC, limit - offset, 0)
        kind, host, copied = self._classify(table[l2_index])
        end = min((gc + 1) * cs, limit)
        if kind == COMPRESSED_KIND:
            return Mapping(kind, end - offset, host)
        i = l2_index + 1
        next_host = host + cs
        while end < limit:
            k, h, c = self._classify(table[i])
            if k != kind or (kind == NORMAL and (h != next_host or c != copied)):
                break
            end = min(end + cs, limit)
            next_host += cs
            i += 1
        start_host = host + (offset & (cs - 1)) if kind == NORMAL else 0
        return Mapping(kind, end - offset, start_host, copied)

    # -- reads ---------------------------------------------------------------------------------

    def _begin_data(self) -> None:
        self._data_in_flight += 1
        self._data_idle.clear()

    def _end_data(self) -> None:
        self._data_in_flight -= 1
        if self._data_in_flight == 0:
            self._data_idle.set()

    async def _read_backing(self, offset: int, length: int) -> bytes:
        backing = self.backing_node
        if backing is None or offset >= backing.size:
            return bytes(length)
        n = min(length, backing.size - offset)
        data = bytes(await backing.read(offset, n))
        return data + bytes(length - n) if n < length else data

    async def _read_compressed(self, entry: int) -> bytes:
        coffset = entry & self._coffmask
        nsectors = ((entry >> self._cshift) & self._cmask) + 1
        csize = nsectors * 512 - (coffset & 511)
        if coffset < self.cs or coffset >= MAX_HOST_OFFSET:
            raise _eio(f"compressed cluster offset {coffset:#x} is invalid")
        raw = await self.file.read_clamped(coffset, csize)
        return decompress(raw, self.hdr.compression_type, self.cs)

    async def _read_mapped(self, m: Mapping, offset: int, length: int) -> Buffer:
        if m.kind == NORMAL:
            n = min(length, self.file.size - m.host)
            data = await self.file.read_data(m.host, n)
            return bytes(data) + bytes(length - n) if n < length else data
        if m.kind == ZERO:
            return bytes(length)
        if m.kind == UNALLOC:
            return await self._read_backing(offset, length)
        cluster = await self._read_compressed(m.host)
        start = offset & (self.cs - 1)
        return cluster[start : start + length]

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        end = offset + length
        parts: list[Buffer] = []
        pos = offset
        while pos < end:
            async with self.lock:
                m = await self._map(pos, end - pos)
                self._begin_data()
            try:
                parts.append(await self._read_mapped(m, pos, m.length))
            finally:
                self._end_data()
            pos += m.length
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- writes --------------------------------------------------------------------------------

    def _free_entry(self, entry: int) -> None:
        """Queue the clusters an old L2 entry referenced for a decrement after the next flush."""
        if entry & COMPRESSED:
            coffset = entry & self._coffmask
            nsectors = ((entry >> self._cshift) & self._cmask) + 1
            csize = nsectors * 512 - (coffset & 511)
            first, last = coffset // self.cs, (coffset + csize - 1) // self.cs
            self.pending_frees.extend(range(first, last + 1))
            return
        host = entry & L2_OFFSET_MASK
        if host:
            self.pending_frees.append(host // self.cs)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        view = memoryview(data).cast("B")
        if not flags:  # the common case: skip the (slow) enum flag tests
            await self._write(offset, view)
            return
        if flags & WriteFlags.COMPRESSED:
            await self._write_compressed(offset, view)
        else:
            await self._write(offset, view)
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _write(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        pos = offset
        while pos < end:
            inplace: Mapping | None = None
            alloc: _Allocation | None = None
            busy: _Allocation | None = None
            m = None if self.lock.locked() else self._fast_map(pos, end - pos)
            if m is not None:
                # Everything needed is cached: map and allocate without an await, which
                # makes this atomic on the loop like a section under the lock would be.
                inplace, busy = self._inplace_or_busy(m, pos)
                if inplace is None and busy is None:
                    chunk = view[pos - offset : pos - offset + m.length]
                    alloc = self._fast_allocation(pos, chunk, m)
                    if alloc is None:
                        m = None  # needs I/O: the locked path below
            if m is None:
                async with self.lock:
                    m = await self._map(pos, end - pos)
                    inplace, busy = self._inplace_or_busy(m, pos)
                    if inplace is None and busy is None:
                        chunk = view[pos - offset : pos - offset + m.length]
                        alloc = await self._prepare_allocation(pos, chunk)
            if busy is not None:
                await busy.wait()  # then map again: the clusters have a home now
                continue
            if inplace is not None:
                try:
                    await self.file.write(
                        inplace.host, view[pos - offset : pos - offset + inplace.length]
                    )
                finally:
                    self._end_data()
            elif alloc is not None:
                await self._finish_allocation(alloc)
            pos += m.length

    def _inplace_or_busy(self, m: Mapping, pos: int) -> tuple[Mapping | None, _Allocation | None]:
        """For a mapped run: (m, None) to write in place (data write begun), (None, busy)
        to wait for an allocation in flight there, (None, None) to allocate."""
        if m.kind == NORMAL and m.copied:
            if self._is_metadata(m.host, m.length):
                raise _eio(f"write to {m.host:#x} would overwrite metadata")
            self._begin_data()
            return m, None
        return None, self._allocating_overlap(pos, m.length)

    def _fast_map(self, offset: int, length: int) -> Mapping | None:
        """:meth:`_map` without I/O, when the L2 table is cached and needs no L1 update.

        None sends the caller to the locked path (no table yet, table not cached, or an L1
        entry without the COPIED flag, which allocation would have to check and set).
        """
        l1_index = (offset >> self.cb) // self.l2e
        l2_offset = self._checked_l2_offset(l1_index)
        if not l2_offset or not self.l1[l1_index] & COPIED:
            return None
        table = self.l2.cached(l2_offset)
        return None if table is None else self._map_in(table, offset, length)

    def _fast_allocation(self, pos: int, data: memoryview, m: Mapping) -> _Allocation | None:
        """:meth:`_prepare_allocation` without I/O, or None when it would need some.

        Only for clusters whose untouched parts read as zeroes (nothing to copy), with the
        L2 table cached (checked by :meth:`_fast_map`) and the refcounts cached.
        """
        if not (m.kind == ZERO or (m.kind == UNALLOC and self.backing_node is None)):
            return None
        host = self.refs.try_alloc(((pos + len(data) - 1) >> self.cb) - (pos >> self.cb) + 1)
        if host is None:
            return None
        return self._allocation(pos, data, host, None, None)

    def _allocating_overlap(self, offset: int, length: int) -> _Allocation | None:
        """An in-flight allocating write to a cluster of ``[offset, offset+length)``."""
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        for a in self._allocating:
            if a.first <= last and first <= a.last:
                return a
        return None

    async def _cow(self, guest: int, length: int) -> Buffer | None:
        """Old content of a partial cluster's untouched part; None when it reads as zeroes."""
        m = await self._map(guest, length)
        if m.kind == ZERO or (m.kind == UNALLOC and self.backing_node is None):
            return None
        return await self._read_mapped(m, guest, length)

    async def _prepare_allocation(self, pos: int, data: memoryview) -> _Allocation:
        """Allocate new clusters for ``data`` (within one L2 table); caller holds the lock.

        The data is written by :meth:`_finish_allocation` without the lock, so that other
        requests' metadata work and data writes overlap with it; writes to the same clusters
        wait for it (:meth:`_allocating_overlap`).
        """
        cs = self.cs
        first = pos >> self.cb
        last = (pos + len(data) - 1) >> self.cb
        n = last - first + 1
        head = pos - first * cs
        tail_at = pos + len(data)
        tail = (last + 1) * cs - tail_at
        head_data = await self._cow(first * cs, head) if head else None
        tail_data = await self._cow(tail_at, tail) if tail else None
        found = await self._l2_table(first // self.l2e, alloc=True)
        assert found is not None
        host = await self.refs.alloc(n)
        return self._allocation(pos, data, host, head_data, tail_data)

    def _allocation(
        self,
        pos: int,
        data: memoryview,
        host: int,
        head_data: Buffer | None,
        tail_data: Buffer | None,
    ) -> _Allocation:
        """Record an allocation of clusters at ``host`` for ``data`` (L2 table known)."""
        cs = self.cs
        first = pos >> self.cb
        last = (pos + len(data) - 1) >> self.cb
        n = last - first + 1
        head = pos - first * cs
        tail = (last + 1) * cs - pos - len(data)
        l1_index, l2_index = divmod(first, self.l2e)
        l2_offset = self.l1[l1_index] & L1_OFFSET_MASK
        # Fresh file space reads as zeroes already: zero parts of the clusters need no write.
        fresh = self.file.reads_zero(host)
        start = head if head_data is None and fresh else 0
        stop = n * cs - (tail if tail_data is None and fresh else 0)
        if start == head and stop == n * cs - tail:
            buf: bytes | bytearray | memoryview = data
        else:
            out = bytearray(stop - start)
            if start == 0 and head:
                out[:head] = head_data if head_data is not None else bytes(head)
            out[head - start : head - start + len(data)] = data
            if stop > n * cs - tail:
                out[head - start + len(data) :] = (
                    tail_data if tail_data is not None else bytes(tail)
                )
            buf = out
        alloc = _Allocation(first, last, l2_offset, l2_index, host, host + start, buf)
        self._allocating.append(alloc)
        return alloc

    async def _finish_allocation(self, a: _Allocation) -> None:
        """Write the data of a prepared allocation, then point the L2 entries at it."""
        cs = self.cs
        n = a.last - a.first + 1
        try:
            try:
                await self.file.write(a.write_at, a.data)
            except BaseException:
                async with self.lock:
                    for c in range(a.host // cs, a.host // cs + n):
                        await self.refs.decrement(c)
                raise
            table = None if self.lock.locked() else self.l2.cached(a.l2_offset)
            if table is not None:
                self._set_l2(a, table)  # no await: atomic like a locked section
            else:
                async with self.lock:
                    self._set_l2(a, await self.l2.get(a.l2_offset))
        finally:
            self._allocating.remove(a)
            if a.done is not None:
                a.done.set()

    def _set_l2(self, a: _Allocation, table: array[int]) -> None:
        """Point the L2 entries of a finished allocation at its new clusters."""
        cs = self.cs
        for i in range(a.last - a.first + 1):
            old = table[a.l2_index + i]
            table[a.l2_index + i] = (a.host + i * cs) | COPIED
            if old:
                self._free_entry(old)
        self.l2.mark_dirty(a.l2_offset, table)

    async def _write_compressed(self, offset: int, view: memoryview) -> None:
        cs = self.cs
        if offset % cs or (len(view) % cs and offset + len(view) != self.hdr.size):
            raise io_error(errno.EINVAL, "qcow2: compressed writes must cover whole clusters")
        for start in range(0, len(view), cs):
            chunk = view[start : start + cs]
            guest = offset + start
            packed = compress(bytes(chunk) + bytes(cs - len(chunk)), self.hdr.compression_type)
            if len(packed) > cs - 512:
                await self._write(guest, chunk)
                continue
            while True:
                async with self.lock:
                    busy = self._allocating_overlap(guest, len(chunk))
                    if busy is None:
                        await self._store_compressed(guest, packed)
                        break
                await busy.wait()

    async def _store_compressed(self, guest: int, packed: bytes) -> None:
        cs = self.cs
        gc = guest >> self.cb
        l1_index, l2_index = divmod(gc, self.l2e)
        found = await self._l2_table(l1_index, alloc=True)
        assert found is not None
        cbyte = self._cbyte
        if cbyte and (cbyte % cs) + len(packed) <= cs and cbyte % cs:
            host = cbyte
            await self.refs.increment(host // cs)
        else:
            host = await self.refs.alloc(1)
        self._cbyte = host + len(packed)
        await self.file.write(host, packed)
        nsectors = ((host + len(packed) - 1) >> 9) - (host >> 9) + 1
        entry = COMPRESSED | ((nsectors - 1) << self._cshift) | host
        l2_offset, table = found
        if l2_offset not in self.l2:
            table = await self.l2.get(l2_offset)
        old = table[l2_index]
        table[l2_index] = entry
        self._free_entry(old)
        self.l2.mark_dirty(l2_offset, table)

    # -- zeroes and discard --------------------------------------------------------------------

    async def _reads_zero(self, offset: int, length: int) -> bool:
        async with self.lock:
            m = await self._map(offset, length)
        if m.length < length:
            return False
        if m.kind == ZERO:
            return True
        if m.kind == UNALLOC:
            backing = self.backing_node
            return backing is None or offset >= backing.size
        return False

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        cs = self.cs
        end = offset + length
        first = -(-offset // cs) * cs
        last = end // cs * cs if end < self.hdr.size else -(-end // cs) * cs
        if first >= last or (self.hdr.version < 3 and self.backing_node is not None):
            if flags & WriteFlags.NO_FALLBACK:
                raise io_error(errno.ENOTSUP)
            await self._zero_bytes(offset, length)
        else:
            if offset < first:
                await self._zero_bytes(offset, first - offset)
            await self._set_clusters(
                first, min(last, self.hdr.size), unmap=bool(flags & WriteFlags.MAY_UNMAP), zero=True
            )
            if min(last, end) < end:
                await self._zero_bytes(last, end - last)
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _zero_bytes(self, offset: int, length: int) -> None:
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, self.cs - pos % self.cs)
            if not await self._reads_zero(pos, n):
                await self._write(pos, memoryview(bytes(n)))
            pos += n

    async def discard(self, offset: int, length: int) -> None:
        cs = self.cs
        end = offset + length
        first = -(-offset // cs) * cs
        last = end // cs * cs if end < self.hdr.size else -(-end // cs) * cs
        if first < last:
            await self._set_clusters(first, min(last, self.hdr.size), unmap=True, zero=False)

    async def _set_clusters(self, start: int, end: int, *, unmap: bool, zero: bool) -> None:
        """Make whole clusters read as zeroes (``zero``) or discard them."""
        v3 = self.hdr.version >= 3
        has_backing = self.backing_node is not None
        async with self.lock:
            pos = start
            while pos < end:
                gc = pos >> self.cb
                l1_index, l2_index = divmod(gc, self.l2e)
                table_end = min(end, (l1_index + 1) * self.l2e * self.cs)
                count = -(-(table_end - pos) // self.cs)
                found = await self._l2_table(l1_index, alloc=False)
                if found is None and not (v3 and has_backing):
                    pos = table_end
                    continue
                if found is None:
                    found = await self._l2_table(l1_index, alloc=True)
                    assert found is not None
                l2_offset, table = found
                for i in range(l2_index, l2_index + count):
                    old = table[i]
                    kind, host, copied = self._classify(old)
                    if v3 and (has_backing or (zero and kind != UNALLOC)):
                        if kind == NORMAL and copied and zero and not unmap:
                            new = host | COPIED | ZERO_FLAG
                        else:
                            new = ZERO_FLAG
                    else:
                        new = 0
                    if (kind == ZERO and new == ZERO_FLAG and not host) or old == new:
                        continue
                    table[i] = new
                    if new & L2_OFFSET_MASK == 0:
                        self._free_entry(old)
                if l2_offset not in self.l2:
                    await self.l2.get(l2_offset)
                self.l2.mark_dirty(l2_offset, table)
                pos = table_end

    # -- status --------------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        async with self.lock:
            m = await self._map(offset, length)
        if m.kind in (NORMAL, COMPRESSED_KIND):
            return Extent(offset, m.length, Status.DATA | Status.ALLOCATED)
        if m.kind == ZERO:
            return Extent(offset, m.length, Status.ZERO | Status.ALLOCATED)
        backing = self.backing_node
        if backing is None or offset >= backing.size:
            return Extent(offset, m.length, Status.ZERO)
        ext = await backing.block_status(offset, min(m.length, backing.size - offset))
        return Extent(offset, ext.length, ext.status & (Status.DATA | Status.ZERO))

    # -- flush and close -----------------------------------------------------------------------

    async def _flush_metadata(self) -> None:
        """Write dirty metadata in dependency order (caller holds the lock)."""
        await self.refs.flush()
        await self.l2.flush()
        if (self.l1_dirty or self.pending_frees) and self.l2.unsynced:
            await self.file.flush()
            self.l2.unsynced = False
        if self.l1_dirty:
            for index in sorted(self.l1_dirty):
                await self.file.write(
                    self.hdr.l1_table_offset + index * 8, struct.pack(">Q", self.l1[index])
                )
            self.l1_dirty.clear()
            await self.file.flush()
        if self.pending_frees:
            await self._data_idle.wait()
            frees, self.pending_frees = self.pending_frees, []
            for cluster in frees:
                if self._cbyte and cluster == self._cbyte // self.cs:
                    self._cbyte = 0
                await self.refs.decrement(cluster)

    async def flush(self) -> None:
        if self.node.read_only:
            return
        async with self.lock:
            await self._flush_metadata()
            await self.refs.flush()
        await self.file.flush()

    # -- persistent bitmaps in the image (bitmap_store.image.ImageBitmaps) ------------------

    @property
    def bitmap_file(self) -> BlockNode:
        return self.file_node

    def can_store_bitmaps(self) -> bool:
        return self.hdr.version >= 3

    async def stored_bitmaps(self) -> list[StoredEntry]:
        return list(await bitmaps.read_directory(self.file, self.hdr))

    async def load_stored_bitmap(self, entry: StoredEntry) -> bytes:
        assert isinstance(entry, bitmaps.StoredBitmap)
        return await bitmaps.load_bitmap_bytes(self.file, self.hdr, entry)

    async def mark_bitmaps_in_use(self, names: set[str]) -> None:
        await bitmaps.set_in_use(self.file, self.hdr, names)

    async def store_bitmaps(self, fresh: list[FreshBitmap], kept: Iterable[StoredEntry]) -> None:
        out = [
            bitmaps.NewBitmap(
                b.name,
                b.granularity.bit_length() - 1,
                bitmaps.FLAG_AUTO if b.recording else 0,
                b.data,
            )
            for b in fresh
        ]
        current = {e.name: e for e in await bitmaps.read_directory(self.file, self.hdr)}
        for s in kept:
            assert isinstance(s, bitmaps.StoredBitmap)
            e = current.get(s.name, s)
            flags = e.flags | (bitmaps.FLAG_IN_USE if e.type == bitmaps.TYPE_DIRTY_TRACKING else 0)
            out.append(
                bitmaps.NewBitmap(
                    s.name, e.granularity_bits, flags, None, (e.table_offset, e.table_size)
                )
            )
        if out or current:
            await bitmaps.write_bitmaps(self, out)

    async def remove_stored_bitmap(self, name: str) -> None:
        entries = await bitmaps.read_directory(self.file, self.hdr)
        if all(e.name != name for e in entries):
            return
        keep = [
            bitmaps.NewBitmap(
                e.name, e.granularity_bits, e.flags, None, (e.table_offset, e.table_size)
            )
            for e in entries
            if e.name != name
        ]
        await bitmaps.write_bitmaps(self, keep)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.node.read_only:
            async with self.lock:
                await self._flush_metadata()
                await self.refs.flush()
            await self.file.flush()
            await self.file.trim(self.refs.next_free * self.cs)
