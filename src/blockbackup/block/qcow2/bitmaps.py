"""The qcow2 bitmaps extension: list stored dirty bitmaps, load their data, and mark the
ones that should track writes as in use when the image is opened read-write.

Every size read from the image is bounded before anything is allocated for it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from blockbackup.block.driver import io_error
from blockbackup.block.qcow2.fileio import ImageFile
from blockbackup.block.qcow2.header import AUTOCLEAR_BITMAPS, Header

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


async def load_bitmap(file: ImageFile, hdr: Header, bm: StoredBitmap) -> object:
    """The bitmap as a :class:`blockbackup.block.bitmap.Bitmap`."""
    from blockbackup.block.bitmap import Bitmap

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
