"""Cluster compression for qcow2: raw deflate (zlib type) and zstd.

Both directions are pure CPU work with a bounded output (one cluster), so a hostile
compressed cluster can never make us allocate more than a cluster of output.
"""

from __future__ import annotations

import errno
import zlib

import zstandard

from blockbackup.block.driver import io_error
from blockbackup.block.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

#: qcow2 deflate streams are raw (no zlib header) with a 4 KiB window.
_WBITS = -12


def compress(data: bytes | bytearray | memoryview, ctype: int) -> bytes:
    """Compress one cluster."""
    if ctype == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _WBITS, 9)
        return c.compress(data) + c.flush()
    if ctype == COMPRESSION_ZSTD:
        return bytes(zstandard.ZstdCompressor(write_content_size=False).compress(data))
    raise io_error(errno.ENOTSUP, f"compression type {ctype}")


def decompress(data: bytes | bytearray | memoryview, ctype: int, cluster_size: int) -> bytes:
    """Decompress one cluster; raise EIO unless exactly ``cluster_size`` bytes come out."""
    try:
        if ctype == COMPRESSION_ZLIB:
            d = zlib.decompressobj(_WBITS)
            out = d.decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            with zstandard.ZstdDecompressor().stream_reader(bytes(data)) as reader:
                out = b""
                while len(out) < cluster_size:
                    chunk = reader.read(cluster_size - len(out))
                    if not chunk:
                        break
                    out += chunk
        else:
            raise io_error(errno.EIO, f"unknown compression type {ctype}")
    except (zlib.error, zstandard.ZstdError) as err:
        raise io_error(errno.EIO, f"qcow2: corrupt compressed cluster ({err})") from None
    if len(out) < cluster_size:
        raise io_error(errno.EIO, "qcow2: compressed cluster decompresses to too little data")
    return bytes(out[:cluster_size])
