"""The qcow2 bitmaps extension: list stored dirty bitmaps, load their data, mark them in use
while the image is open read-write, and store them (directory, tables, data, header).

Why here and not in the driver: the driver only keeps the image's data consistent; which
bitmaps exist and when they are stored is decided by :mod:`blockbackup.block.bitmap_store`.

Every size read from the image is bounded before anything is allocated for it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockbackup.block.bitmap import Bitmap
from blockbackup.block.driver import io_error
from blockbackup.block.qcow2.fileio import ImageFile
from blockbackup.block.qcow2.header import AUTOCLEAR_BITMAPS, BitmapsExt, Header

if TYPE_CHECKING:
    from blockbackup.block.qcow2.driver import Qcow2Driver

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
TYPE_DIRTY_TRACKING = 1
MAX_BITMAP_TABLE_BYTES = 64 << 20
_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes


@dataclass(slots=True)
class StoredBitmap:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes
    #: Offset of this entry in the image file (to update its flags in place).
    entry_offset: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    @property
    def supported(self) -> bool:
        """A dirty-tracking bitmap whose granularity and extra data we understand."""
        return (
            self.type == TYPE_DIRTY_TRACKING
            and 9 <= self.granularity_bits <= 31
            and (not self.extra_data or bool(self.flags & FLAG_EXTRA_DATA_COMPATIBLE))
        )


def _eio(text: str) -> OSError:
    return io_error(errno.EIO, f"qcow2: {text}")


async def read_directory(file: ImageFile, hdr: Header) -> list[StoredBitmap]:
    """The bitmap directory; empty when the extension is absent or inconsistent."""
    ext = hdr.bitmaps
    if ext is None or not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        return []
    raw = await file.read(ext.directory_offset, ext.directory_size)
    out: list[StoredBitmap] = []
    pos = 0
    names: set[str] = set()
    for _ in range(ext.nb_bitmaps):
        if pos + _ENTRY.size > len(raw):
            raise _eio("bitmap directory is truncated")
        table_offset, table_size, flags, type_, gbits, name_size, extra_size = _ENTRY.unpack_from(
            raw, pos
        )
        start = pos + _ENTRY.size
        end = start + extra_size + name_size
        if end > len(raw) or name_size == 0:
            raise _eio("invalid bitmap directory entry")
        extra = bytes(raw[start : start + extra_size])
        name = bytes(raw[start + extra_size : end]).decode(errors="replace")
        if name in names:
            raise _eio(f"duplicate bitmap name '{name}'")
        names.add(name)
        if table_offset % hdr.cluster_size or table_size * 8 > MAX_BITMAP_TABLE_BYTES:
            raise _eio(f"invalid bitmap table for '{name}'")
        out.append(
            StoredBitmap(
                name,
                table_offset,
                table_size,
                flags,
                type_,
                gbits,
                extra,
                ext.directory_offset + pos,
            )
        )
        pos = end + (-end % 8)
    return out


async def load_bitmap_bytes(file: ImageFile, hdr: Header, bm: StoredBitmap) -> bytes:
    """The raw bitmap data (one bit per granule, LSB first), as stored."""
    if bm.type != TYPE_DIRTY_TRACKING or not 0 <= bm.granularity_bits <= 63:
        raise _eio(f"bitmap '{bm.name}' has an unsupported type or granularity")
    cs = hdr.cluster_size
    nbits = -(-hdr.size // bm.granularity)
    nbytes = -(-nbits // 8)
    if -(-nbytes // cs) != bm.table_size:
        raise _eio(f"bitmap '{bm.name}' has a table of the wrong size")
    table = struct.unpack(f">{bm.table_size}Q", await file.read(bm.table_offset, bm.table_size * 8))
    out = bytearray()
    for entry in table:
        offset = entry & 0x00FFFFFFFFFFFE00
        if offset:
            if offset % cs:
                raise _eio(f"bitmap '{bm.name}' data offset is not aligned")
            out += await file.read(offset, cs)
        else:
            out += (b"\xff" if entry & 1 else b"\0") * cs
    return bytes(out[:nbytes])


async def load_bitmap(file: ImageFile, hdr: Header, bm: StoredBitmap) -> Bitmap:
    """The bitmap as a :class:`blockbackup.block.bitmap.Bitmap`."""
    data = await load_bitmap_bytes(file, hdr, bm)
    return Bitmap.from_bytes(data, hdr.size, bm.granularity)


async def mark_auto_bitmaps_in_use(file: ImageFile, hdr: Header) -> None:
    """Set the in-use flag of every enabled (``auto``) bitmap and flush.

    Done when the image is opened read-write by a writer that does not keep the stored
    bitmaps in sync, so that nobody trusts them afterwards.
    """
    changed = False
    for bm in await read_directory(file, hdr):
        if bm.auto and not bm.in_use:
            await file.write(bm.entry_offset + 12, struct.pack(">I", bm.flags | FLAG_IN_USE))
            changed = True
    if changed:
        await file.flush()


# -- storing ------------------------------------------------------------------------------------


@dataclass(slots=True)
class NewBitmap:
    """A bitmap to store: its bits, or an existing table kept as it is (inconsistent ones)."""

    name: str
    granularity_bits: int
    flags: int
    data: bytes | None = None
    keep_table: tuple[int, int] | None = None  # (table_offset, table_size) of a kept entry


def _entry_bytes(b: NewBitmap, table_offset: int, table_size: int) -> bytes:
    raw = b.name.encode()
    out = _ENTRY.pack(
        table_offset, table_size, b.flags, TYPE_DIRTY_TRACKING, b.granularity_bits, len(raw), 0
    )
    out += raw
    return out + bytes(-len(out) % 8)


async def _table_clusters(file: ImageFile, hdr: Header, offset: int, size: int) -> list[int]:
    """Host clusters a stored bitmap owns: its table and its data clusters."""
    cs = hdr.cluster_size
    table = struct.unpack(f">{size}Q", await file.read(offset, size * 8))
    out = list(range(offset // cs, offset // cs + -(-size * 8 // cs)))
    for entry in table:
        host = entry & 0x00FFFFFFFFFFFE00
        if host:
            out.append(host // cs)
    return out


async def write_bitmaps(drv: Qcow2Driver, bitmaps: list[NewBitmap]) -> None:
    """Replace the stored bitmaps of the image with ``bitmaps`` (crash-safe order).

    New clusters are written and their refcounts made durable before the directory naming
    them, the directory before the header pointing to it, and the old clusters are only
    released after the header no longer names them: a crash at any point leaves either the
    old or the new set, and at worst leaked clusters.
    """
    file, hdr = drv.file, drv.hdr
    cs = hdr.cluster_size
    if hdr.version < 3:
        raise _eio("bitmaps need a qcow2 v3 image")
    async with drv.lock:
        old = await read_directory(file, hdr)
        old_dir = hdr.bitmaps
        directory = bytearray()
        for b in bitmaps:
            if b.keep_table is not None:
                directory += _entry_bytes(b, *b.keep_table)
                continue
            assert b.data is not None
            nclusters = -(-len(b.data) // cs)
            table = [0] * nclusters
            for k in range(nclusters):
                chunk = b.data[k * cs : (k + 1) * cs]
                if chunk.count(0) == len(chunk):
                    continue
                host = await drv.refs.alloc(1)
                await file.write(host, chunk + bytes(cs - len(chunk)))
                table[k] = host
            tclusters = max(1, -(-nclusters * 8 // cs))
            toff = await drv.refs.alloc(tclusters)
            raw = struct.pack(f">{nclusters}Q", *table)
            await file.write(toff, raw + bytes(tclusters * cs - len(raw)))
            directory += _entry_bytes(b, toff, nclusters)
        doff = 0
        if bitmaps:
            doff = await drv.refs.alloc(-(-len(directory) // cs))
            await file.write(doff, bytes(directory) + bytes(-len(directory) % cs))
        await drv.refs.flush()
        await file.flush()
        if bitmaps:
            hdr.bitmaps = BitmapsExt(len(bitmaps), len(directory), doff)
            hdr.autoclear_features |= AUTOCLEAR_BITMAPS
        else:
            hdr.bitmaps = None
            hdr.autoclear_features &= ~AUTOCLEAR_BITMAPS
        await write_header(file, hdr)
        await file.flush()
        kept = {b.keep_table for b in bitmaps if b.keep_table is not None}
        frees: list[int] = []
        for o in old:
            if (o.table_offset, o.table_size) not in kept:
                frees += await _table_clusters(file, hdr, o.table_offset, o.table_size)
        if old_dir is not None:
            first = old_dir.directory_offset // cs
            frees += range(first, first + -(-old_dir.directory_size // cs))
        for c in frees:
            await drv.refs.decrement(c)
        await drv.refs.flush()


async def write_header(file: ImageFile, hdr: Header) -> None:
    """Rewrite the header cluster (fields, extensions, backing file name after them)."""
    head = hdr.serialize()
    if hdr.backing_file is not None:
        name = hdr.backing_file.encode()
        hdr.backing_file_offset = len(head)
        hdr.backing_file_size = len(name)
        head = hdr.serialize() + name
    if len(head) > hdr.cluster_size:
        raise _eio("the header does not fit in its cluster")
    await file.write(0, head)


async def set_in_use(file: ImageFile, hdr: Header, names: set[str] | None = None) -> None:
    """Set the in-use flag of the named stored bitmaps (all if None) and flush."""
    changed = False
    for bm in await read_directory(file, hdr):
        if (names is None or bm.name in names) and not bm.in_use:
            await file.write(bm.entry_offset + 12, struct.pack(">I", bm.flags | FLAG_IN_USE))
            changed = True
    if changed:
        await file.flush()
