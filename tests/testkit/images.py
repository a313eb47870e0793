"""Shared helpers for backup tests: images on disk and an independent reader."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path
from typing import Any


def make_image(path: Path, size: int, extents: list[tuple[int, bytes]] | None = None) -> Path:
    """A sparse raw file of ``size`` bytes with ``extents`` written at their offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents or []:
            f.seek(offset)
            f.write(data)
    return path


def read_file(path: Path) -> bytes:
    """The file's bytes, read with plain os calls (independent of blockbackup)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def raw_node(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    """blockdev-add options of a raw node over a file, as written for qemu-storage-daemon."""
    return {
        "driver": "raw",
        "node-name": name,
        "file": {"driver": "file", "filename": str(path), **extra},
    }


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_bytes(path: Path, offset: int = 0, length: int | None = None) -> int:
    """How much of the file's range is in the page cache (``mincore``), page-rounded."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if length is None:
            length = os.fstat(fd).st_size - offset
        start = offset - offset % _PAGE
        size = offset + length - start
        if size <= 0:
            return 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = ctypes.create_string_buffer(-(-size // _PAGE))
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec.raw) * _PAGE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def page_cache_drops(directory: Path) -> bool:
    """Whether the file system under ``directory`` evicts clean pages on request (tmpfs
    never does: its pages are the data)."""
    probe = directory / "drop-probe"
    probe.write_bytes(os.urandom(1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    dropped = cached_bytes(probe) < 1 << 20
    probe.unlink()
    return dropped
