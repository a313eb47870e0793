"""Shared helpers for backup tests: images on disk and an independent reader."""

from __future__ import annotations

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
