"""The qcow2 header and its extensions: parse, validate, serialise.

Everything read from the first cluster of an image goes through :func:`parse_header`, which
checks every field an attacker could use to make the driver read or allocate outside sane
bounds, so the rest of the driver can trust the numbers it gets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blockbackup.errors import BlockBackupError

MAGIC = b"QFI\xfb"

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
#: Host offsets and L1/L2 pointers are 56-bit.
MAX_HOST_OFFSET = 1 << 56

_BASE = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 bytes: features, refcount_order, header_length


@dataclass(slots=True)
class BitmapsExt:
    """The bitmaps header extension (only the directory location)."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass(slots=True)
class Header:
    """A parsed, validated qcow2 header (all offsets in bytes)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    #: Bytes of header fields past the ones known here (preserved on rewrite).
    extra_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    bitmaps: BitmapsExt | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    has_crypto_ext: bool = False
    data_file: str | None = None
    #: Unknown extensions, kept verbatim (type, data) when the header is rewritten.
    unknown_exts: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    def serialize(self) -> bytes:
        """The header and its extensions (without the backing file name)."""
        out = bytearray(
            _BASE.pack(
                MAGIC,
                self.version,
                self.backing_file_offset,
                self.backing_file_size,
                self.cluster_bits,
                self.size,
                self.crypt_method,
                self.l1_size,
                self.l1_table_offset,
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.nb_snapshots,
                self.snapshots_offset,
            )
        )
        if self.version >= 3:
            out += _V3.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            tail = bytearray(self.header_length - V3_HEADER_LENGTH)
            if self.extra_fields:
                tail[: len(self.extra_fields)] = self.extra_fields
            if len(tail) >= 1:
                tail[0] = self.compression_type
            out += tail
        exts: list[tuple[int, bytes]] = []
        if self.backing_format is not None:
            exts.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        if self.feature_names:
            table = bytearray()
            for (kind, bit), name in sorted(self.feature_names.items()):
                table += struct.pack(">BB46s", kind, bit, name.encode()[:46])
            exts.append((EXT_FEATURE_TABLE, bytes(table)))
        if self.bitmaps is not None:
            b = self.bitmaps
            exts.append(
                (
                    EXT_BITMAPS,
                    struct.pack(">IIQQ", b.nb_bitmaps, 0, b.directory_size, b.directory_offset),
                )
            )
        exts.extend(self.unknown_exts)
        if self.version >= 3:
            for kind, data in exts:
                out += struct.pack(">II", kind, len(data)) + data
                out += bytes(-len(data) % 8)
            out += struct.pack(">II", EXT_END, 0)
        return bytes(out)


def default_feature_names() -> dict[tuple[int, int], str]:
    """The feature name table QEMU writes, so tools print names for our bits."""
    return {
        (0, 0): "dirty bit",
        (0, 1): "corrupt bit",
        (0, 2): "external data file",
        (0, 3): "compression type",
        (0, 4): "extended L2 entries",
        (1, 0): "lazy refcounts",
        (2, 0): "bitmaps",
        (2, 1): "raw external data",
    }


def _bad(text: str) -> BlockBackupError:
    return BlockBackupError(f"qcow2: {text}")


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and validate the header cluster ``buf`` of an image ``file_size`` bytes long."""
    if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
        raise BlockBackupError("Image is not in qcow2 format")
    fields = _BASE.unpack_from(buf, 0)
    version = fields[1]
    if version not in (2, 3):
        raise BlockBackupError(f"Unsupported qcow2 version {version}")
    hdr = Header(*fields[1:])
    if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        raise _bad(f"Unsupported cluster size: 2^{hdr.cluster_bits}")
    cs = hdr.cluster_size
    if version >= 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise _bad("Header is truncated")
        (
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.refcount_order,
            hdr.header_length,
        ) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if hdr.header_length < V3_HEADER_LENGTH or hdr.header_length % 8:
            raise _bad("Invalid header length")
        if hdr.header_length > cs or hdr.header_length > len(buf):
            raise _bad("Header too large")
        hdr.extra_fields = bytes(buf[V3_HEADER_LENGTH : hdr.header_length])
        if hdr.header_length > V3_HEADER_LENGTH:
            hdr.compression_type = buf[V3_HEADER_LENGTH]
    if hdr.refcount_order > 6:
        raise _bad("Reference count entry width too large; may not exceed 64 bits")
    _parse_extensions(hdr, buf, cs)
    unknown = hdr.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = [
            hdr.feature_names.get((0, bit), f"Unknown incompatible feature: {1 << bit:x}")
            for bit in range(64)
            if unknown >> bit & 1
        ]
        raise BlockBackupError(f"Unsupported qcow2 feature(s): {', '.join(names)}")
    if hdr.incompatible_features & INCOMPAT_DATA_FILE or hdr.data_file is not None:
        raise _bad("Images with an external data file are not supported")
    if hdr.incompatible_features & INCOMPAT_EXTL2:
        raise _bad("Images with extended L2 entries (subclusters) are not supported")
    if hdr.incompatible_features & INCOMPAT_COMPRESSION:
        if hdr.compression_type == COMPRESSION_ZLIB:
            raise _bad("Invalid compression type: the compression type bit needs a non-zlib type")
    elif hdr.compression_type != COMPRESSION_ZLIB:
        raise _bad("Compression type bit is not set but compression type is not zlib")
    if hdr.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise _bad(f"Unknown compression type {hdr.compression_type}")
    if hdr.crypt_method or hdr.has_crypto_ext:
        raise BlockBackupError("qcow2: Encrypted images are not supported")
    # Backing file name.
    if hdr.backing_file_offset:
        if hdr.backing_file_size > MAX_BACKING_NAME or hdr.backing_file_size == 0:
            raise _bad("Backing file name too long")
        end = hdr.backing_file_offset + hdr.backing_file_size
        if end > cs or end > len(buf):
            raise _bad("Backing file name is outside the header cluster")
        try:
            hdr.backing_file = bytes(buf[hdr.backing_file_offset : end]).decode()
        except UnicodeDecodeError:
            raise _bad("Backing file name is not valid UTF-8") from None
    # Tables.
    if hdr.size >= 1 << 63:
        raise _bad("Image is too big")
    if hdr.l1_size * 8 > MAX_L1_BYTES:
        raise BlockBackupError("Active L1 table too large")
    l2_coverage = cs * hdr.l2_entries
    needed = -(-hdr.size // l2_coverage)
    if hdr.l1_size < needed:
        raise BlockBackupError("L1 table is too small")
    _check_table(hdr.l1_table_offset, hdr.l1_size * 8, cs, file_size, "L1 table")
    if hdr.refcount_table_clusters == 0:
        raise _bad("Image does not contain a reference count table")
    if hdr.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise _bad("Reference count table too large")
    _check_table(
        hdr.refcount_table_offset,
        hdr.refcount_table_clusters * cs,
        cs,
        file_size,
        "Reference count table",
    )
    if hdr.nb_snapshots:
        _check_table(hdr.snapshots_offset, 1, cs, file_size, "Snapshot table")
    if _overlap(
        hdr.l1_table_offset,
        hdr.l1_size * 8,
        hdr.refcount_table_offset,
        hdr.refcount_table_clusters * cs,
    ):
        raise _bad("L1 table overlaps the reference count table")
    if hdr.bitmaps is not None:
        b = hdr.bitmaps
        _check_table(b.directory_offset, b.directory_size, cs, file_size, "Bitmap directory")
    return hdr


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return alen > 0 and blen > 0 and a < b + blen and b < a + alen


def _check_table(offset: int, length: int, cs: int, file_size: int, what: str) -> None:
    if offset % cs:
        raise _bad(f"{what} offset invalid (not aligned to a cluster)")
    if length and offset < cs:
        raise _bad(f"{what} overlaps the image header")
    if offset + length > file_size or offset >= MAX_HOST_OFFSET:
        raise _bad(f"{what} is past the end of the image file")


def _parse_extensions(hdr: Header, buf: bytes, cs: int) -> None:
    if hdr.version < 3:
        return
    pos = hdr.header_length
    end = min(cs, len(buf))
    if hdr.backing_file_offset:
        end = min(end, hdr.backing_file_offset)
    seen: set[int] = set()
    while pos + 8 <= end:
        kind, length = struct.unpack_from(">II", buf, pos)
        pos += 8
        if kind == EXT_END:
            return
        if pos + length > end:
            raise _bad("Invalid header extension (too large)")
        data = bytes(buf[pos : pos + length])
        pos += length + (-length % 8)
        if kind in seen and kind != 0:
            raise _bad(f"Duplicate header extension {kind:#x}")
        seen.add(kind)
        if kind == EXT_BACKING_FORMAT:
            try:
                hdr.backing_format = data.decode()
            except UnicodeDecodeError:
                raise _bad("Invalid backing file format name") from None
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                kind_, bit = data[i], data[i + 1]
                name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode(errors="replace")
                hdr.feature_names[(kind_, bit)] = name
        elif kind == EXT_BITMAPS:
            if length < 24:
                raise _bad("Invalid bitmaps extension size")
            nb, reserved, dsize, doff = struct.unpack_from(">IIQQ", data)
            if reserved or nb == 0 or nb > 65535 or dsize > 64 << 20:
                raise _bad("Invalid bitmaps extension")
            hdr.bitmaps = BitmapsExt(nb, dsize, doff)
        elif kind == EXT_CRYPTO:
            hdr.has_crypto_ext = True
        elif kind == EXT_DATA_FILE:
            hdr.data_file = data.decode(errors="replace")
        else:
            hdr.unknown_exts.append((kind, data))
