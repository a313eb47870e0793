"""The bitmap sidecar file (``IMAGE.bbmap``): persistent dirty bitmaps of images that have no
place for them (raw files, devices), and the crash journal of qcow2 images.

Why a fixed block layout with a checksum per 4 KiB block: the write-ahead dirty log updates
single blocks in place (``pwrite`` + ``fdatasync``), so one torn or corrupt block must be
detectable on its own without invalidating the rest. Everything else (the directory, a
change of the set of bitmaps, the clean close) is a whole-file rewrite made atomic with a
temporary file, ``fsync``, ``rename`` and an ``fsync`` of the directory.

The format is documented in ``docs/bitmap-sidecar.md``; this module is its only reader and
writer, and does blocking I/O (callers run it off the event loop).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field

__all__ = [
    "BLOCK",
    "ENTRY_ENABLED",
    "ENTRY_INCONSISTENT",
    "FLAG_CLEAN",
    "FLAG_JOURNAL",
    "MAGIC",
    "PAYLOAD",
    "VERSION",
    "SidecarEntry",
    "SidecarError",
    "SidecarImage",
    "block_bytes",
    "parse",
    "read",
    "remove_durably",
    "serialize",
    "sidecar_path",
    "write_atomic",
    "write_blocks",
]

MAGIC = b"BBBITMAP"
VERSION = 1
BLOCK = 4096
#: Bitmap bytes per data block (the last 4 bytes of a block are its CRC32).
PAYLOAD = BLOCK - 4
#: File flags.
FLAG_CLEAN = 1 << 0  # written by a clean close: the bits are exact
FLAG_JOURNAL = 1 << 1  # companion journal of a qcow2 image (the image holds the bitmaps)
#: Entry flags.
ENTRY_ENABLED = 1 << 0
ENTRY_INCONSISTENT = 1 << 1

_HEAD = struct.Struct("<8sIIIIQQ")  # magic, version, flags, header_blocks, nb, size, seq: 40
_ENTRY = struct.Struct("<HBBIQQ")  # name_len, gran_bits, flags, reserved, first_block, nbits
_MAX_HEADER_BLOCKS = 1024


class SidecarError(Exception):
    """The sidecar cannot be trusted as a whole (bad header, unknown version, truncated)."""


@dataclass(slots=True)
class SidecarEntry:
    """One bitmap of a sidecar."""

    name: str
    granularity_bits: int
    flags: int
    nbits: int
    first_block: int = 0
    #: The bits (little-endian bit order); None if unreadable.
    data: bytes | None = None
    #: Indexes (relative to the entry) of data blocks that failed their checksum or are
    #: missing.
    bad_blocks: list[int] = field(default_factory=list)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def nbytes(self) -> int:
        return -(-self.nbits // 8)

    @property
    def nblocks(self) -> int:
        return -(-self.nbytes // PAYLOAD)


@dataclass(slots=True)
class SidecarImage:
    """A whole sidecar: its header fields and entries."""

    flags: int
    size: int
    entries: list[SidecarEntry]
    sequence: int = 0
    version: int = VERSION
    header_blocks: int = 1


def sidecar_path(image: str) -> str:
    """Where the sidecar of ``image`` lives."""
    return image + ".bbmap"


def _block_crc(payload: bytes | bytearray | memoryview, index: int) -> int:
    return zlib.crc32(struct.pack("<Q", index), zlib.crc32(payload))


def block_bytes(bits: bytes | bytearray | memoryview, k: int, absolute: int) -> bytes:
    """Data block ``k`` of a bitmap whose bytes are ``bits``, at file block ``absolute``."""
    payload = bytes(bits[k * PAYLOAD : (k + 1) * PAYLOAD])
    payload += bytes(PAYLOAD - len(payload))
    return payload + struct.pack("<I", _block_crc(payload, absolute))


def _layout(img: SidecarImage) -> bytes:
    """Assign data blocks to the entries; return the header region."""
    body = bytearray()
    for e in img.entries:
        raw = e.name.encode()
        body += _ENTRY.pack(len(raw), e.granularity_bits, e.flags, 0, 0, e.nbits)
        body += raw + bytes(-len(raw) % 8)
    blocks = -(-(_HEAD.size + len(body) + 4) // BLOCK)
    img.header_blocks = blocks
    nxt = blocks
    pos = 0
    for e in img.entries:
        e.first_block = nxt
        struct.pack_into("<Q", body, pos + 8, nxt)
        nxt += e.nblocks
        pos += _ENTRY.size + len(e.name.encode()) + (-len(e.name.encode()) % 8)
    head = bytearray(blocks * BLOCK)
    _HEAD.pack_into(
        head, 0, MAGIC, img.version, img.flags, blocks, len(img.entries), img.size, img.sequence
    )
    head[_HEAD.size : _HEAD.size + len(body)] = body
    struct.pack_into("<I", head, len(head) - 4, zlib.crc32(head[:-4]))
    return bytes(head)


def serialize(img: SidecarImage) -> bytes:
    """The whole file; every entry must have ``data``."""
    out = bytearray(_layout(img))
    for e in img.entries:
        assert e.data is not None
        assert len(e.data) == e.nbytes
        for k in range(e.nblocks):
            out += block_bytes(e.data, k, e.first_block + k)
    return bytes(out)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, img: SidecarImage) -> None:
    """Replace ``path`` with ``img`` atomically and durably (blocking)."""
    tmp = f"{path}.tmp{os.getpid()}"
    data = serialize(img)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path)


def remove_durably(path: str) -> None:
    """Delete ``path`` (if present) and make the deletion durable (blocking)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _fsync_dir(path)


def write_blocks(fd: int, blocks: list[tuple[int, bytes]]) -> None:
    """Write ``(file block index, 4096 bytes)`` pairs in place, then ``fdatasync`` (blocking)."""
    for index, data in sorted(blocks):
        os.pwrite(fd, data, index * BLOCK)
    os.fdatasync(fd)


def parse(data: bytes) -> SidecarImage:
    """Parse a sidecar; per-block damage is reported in the entries, not raised.

    :raise SidecarError: the header is unreadable (bad magic, checksum, truncated). An
        unknown version still parses the directory (every version keeps this envelope),
        with no data and the version recorded, so callers report the names inconsistent.
    """
    if len(data) < _HEAD.size or data[:8] != MAGIC:
        raise SidecarError("not a blockbackup bitmap sidecar (bad magic or truncated header)")
    _, version, flags, hblocks, nb, size, seq = _HEAD.unpack_from(data, 0)
    if not 1 <= hblocks <= _MAX_HEADER_BLOCKS or len(data) < hblocks * BLOCK:
        raise SidecarError("truncated or invalid header")
    head = data[: hblocks * BLOCK]
    (crc,) = struct.unpack_from("<I", head, len(head) - 4)
    if zlib.crc32(head[:-4]) != crc:
        raise SidecarError("header checksum mismatch")
    img = SidecarImage(flags, size, [], seq, version, hblocks)
    pos = _HEAD.size
    for _ in range(nb):
        if pos + _ENTRY.size > len(head) - 4:
            raise SidecarError("directory overruns the header")
        nlen, gbits, eflags, _r, first, nbits = _ENTRY.unpack_from(head, pos)
        pos += _ENTRY.size
        name = head[pos : pos + nlen].decode(errors="replace")
        pos += nlen + (-nlen % 8)
        if nlen == 0 or pos > len(head) - 4 or not 9 <= gbits <= 63:
            raise SidecarError("invalid directory entry")
        img.entries.append(SidecarEntry(name, gbits, eflags, nbits, first))
    if version != VERSION:
        return img
    for e in img.entries:
        out = bytearray()
        for k in range(e.nblocks):
            at = (e.first_block + k) * BLOCK
            blk = data[at : at + BLOCK]
            if len(blk) < BLOCK:
                e.bad_blocks.append(k)
                out += bytes(PAYLOAD)
                continue
            payload = blk[:PAYLOAD]
            (bcrc,) = struct.unpack_from("<I", blk, PAYLOAD)
            if _block_crc(payload, e.first_block + k) != bcrc:
                e.bad_blocks.append(k)
            out += payload
        e.data = bytes(out[: e.nbytes])
    return img


def read(path: str) -> SidecarImage | None:
    """Parse the sidecar at ``path``; None if there is none (blocking)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return parse(data)
