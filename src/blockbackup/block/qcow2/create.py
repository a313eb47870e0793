"""Creation of new, empty qcow2 images (the ``blockdev-create``/``qemu-img create`` job).

The image is built in memory (header, refcount table and blocks, an empty L1 table) and
written in one piece, either through a file node or, for tests and the command line, to a
path directly.
"""

from __future__ import annotations

import errno
import os
import struct

from blockbackup.block.node import BlockNode
from blockbackup.block.qcow2.fileio import ImageFile
from blockbackup.block.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    INCOMPAT_COMPRESSION,
    MAX_BACKING_NAME,
    MAX_L1_BYTES,
    V2_HEADER_LENGTH,
    Header,
    default_feature_names,
)
from blockbackup.block.qcow2.refcount import put_refcount
from blockbackup.errors import BlockBackupError


def build_image(
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compression_type: str = "zlib",
    version: int = 3,
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
) -> bytes:
    """The bytes of a new empty image."""
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise BlockBackupError("Cluster size must be a power of two between 512 and 2048k")
    if size < 0 or size % 512:
        raise BlockBackupError("Image size must be a multiple of 512 bytes")
    if version not in (2, 3):
        raise BlockBackupError(f"Invalid compatibility level: '{version}'")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise BlockBackupError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and (refcount_bits != 16 or lazy_refcounts or compression_type != "zlib"):
        raise BlockBackupError("This option requires compat=1.1 or above")
    if compression_type not in COMPRESSION_NAMES:
        raise BlockBackupError(
            f"Parameter 'compression-type' does not accept value '{compression_type}'"
        )
    if backing_fmt is not None and backing_file is None:
        raise BlockBackupError("Backing format cannot be used without backing file")
    cs = cluster_size
    cluster_bits = cs.bit_length() - 1
    refcount_order = refcount_bits.bit_length() - 1
    l1_size = -(-size // (cs * (cs // 8)))
    if l1_size * 8 > MAX_L1_BYTES:
        raise BlockBackupError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
        )
    l1_clusters = -(-l1_size * 8 // cs)
    per_block = cs * 8 // refcount_bits
    rt, rb = 1, 1
    while True:
        total = 1 + rt + rb + l1_clusters
        rb2 = -(-total // per_block)
        rt2 = -(-rb2 * 8 // cs)
        if (rb2, rt2) == (rb, rt):
            break
        rb, rt = rb2, rt2
    ctype = COMPRESSION_NAMES[compression_type]
    hdr = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=(1 + rt + rb) * cs,
        refcount_table_offset=cs,
        refcount_table_clusters=rt,
        nb_snapshots=0,
        snapshots_offset=0,
    )
    if version >= 3:
        hdr.header_length = 112
        hdr.refcount_order = refcount_order
        hdr.compression_type = ctype
        if ctype != COMPRESSION_ZLIB:
            hdr.incompatible_features |= INCOMPAT_COMPRESSION
        if lazy_refcounts:
            hdr.compatible_features |= COMPAT_LAZY_REFCOUNTS
        hdr.feature_names = default_feature_names()
        hdr.backing_format = backing_fmt
    else:
        hdr.header_length = V2_HEADER_LENGTH
    name_len = len(backing_file.encode()) if backing_file is not None else 0
    if len(hdr.serialize()) + name_len > cs:
        hdr.feature_names = {}  # optional; small clusters have no room for it
    head = hdr.serialize()
    if backing_file is not None:
        name = backing_file.encode()
        if len(name) > MAX_BACKING_NAME or len(name) == 0:
            raise BlockBackupError("Backing file name too long")
        if version < 3 and backing_fmt is not None:
            raise BlockBackupError("Backing format requires compat=1.1 or above")
        hdr.backing_file_offset = len(head)
        hdr.backing_file_size = len(name)
        head = hdr.serialize() + name
    if len(head) > cs:
        raise BlockBackupError("Header and backing file name do not fit in the first cluster")
    image = bytearray((1 + rt + rb + l1_clusters) * cs)
    image[: len(head)] = head
    table = [(1 + rt + i) * cs for i in range(rb)]
    image[cs : cs + len(table) * 8] = struct.pack(f">{len(table)}Q", *table)
    total = 1 + rt + rb + l1_clusters
    for c in range(total):
        index, i = divmod(c, per_block)
        start = (1 + rt + index) * cs
        blk = bytearray(image[start : start + cs])
        put_refcount(blk, i, 1, refcount_bits)
        image[start : start + cs] = blk
    return bytes(image)


async def create_qcow2(
    file: BlockNode,
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compression_type: str = "zlib",
    version: int = 3,
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
) -> None:
    """Write a new empty image through the file node ``file``."""
    image = build_image(
        size,
        cluster_size=cluster_size,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        compression_type=compression_type,
        version=version,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
    )
    try:
        await file.truncate(len(image))  # drop old content past the new image, or grow
    except OSError as err:
        if err.errno != errno.ENOTSUP:
            raise
    out = ImageFile(file)
    await out.write(0, image)
    await out.flush()


def create_qcow2_file(path: str | os.PathLike[str], size: int, **kwargs: object) -> None:
    """Create an image at ``path`` (synchronously; tests and the command line)."""
    image = build_image(size, **kwargs)  # type: ignore[arg-type]
    with open(path, "wb") as f:
        f.write(image)
