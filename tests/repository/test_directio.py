"""Objects written past the page cache: exact bytes at every length, the buffered fallback
when a file system refuses ``O_DIRECT``, and a full disk that leaves no temporary file."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

import pytest

from blockbackup.repository import directio
from blockbackup.repository.backend import DirectoryBackend
from blockbackup.repository.directio import ALIGN
from testkit.tmpfs import mounted_tmpfs

MiB = 1 << 20
SIZES = [
    0,
    1,
    directio.DIRECT_MIN - 1,  # the largest buffered one
    directio.DIRECT_MIN,
    directio.DIRECT_MIN + 1,
    directio.BOUNCE_SIZE * 3 + 4095,  # pieces, and a last block to pad and cut
    16 * MiB + 7,  # a pack
]


@pytest.mark.parametrize("size", SIZES)
def test_every_length_reads_back_exactly(tmp_path: Path, size: int) -> None:
    backend = DirectoryBackend(tmp_path)
    data = os.urandom(size)
    backend.put("data/ab/x", data)
    backend.put_if_absent("data/ab/y", memoryview(bytearray(data)))
    with mmap.mmap(-1, size + ALIGN) as aligned, memoryview(aligned) as view:  # as a pack's
        view[:size] = data
        backend.put("data/ab/z", view[:size])
    assert backend.get("data/ab/x") == data
    assert backend.get("data/ab/y") == data
    assert backend.get("data/ab/z") == data
    assert backend.size("data/ab/x") == size
    assert backend.get("data/ab/x", max(size - 5, 0), 5) == data[max(size - 5, 0) :][:5]


def test_a_large_object_is_opened_for_direct_writes(tmp_path: Path) -> None:
    fd = directio.open_new(tmp_path / "big", directio.DIRECT_MIN)
    small = directio.open_new(tmp_path / "small", directio.DIRECT_MIN - 1)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        assert not fcntl.fcntl(small, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
        os.close(small)


def test_a_refused_direct_write_is_done_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that opens with O_DIRECT but refuses the write (some FUSE ones)."""
    real_write = os.write
    refused: list[int] = []

    def write(fd: int, data: memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    data = os.urandom(2 * MiB + 3)
    DirectoryBackend(tmp_path).put("data/ab/x", data)
    assert refused
    assert (tmp_path / "data" / "ab" / "x").read_bytes() == data


def test_a_full_disk_fails_the_put_and_leaves_nothing(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "8m") as root:
        backend = DirectoryBackend(root)
        with pytest.raises(OSError, match="No space left") as failed:
            backend.put("data/ab/x", os.urandom(12 * MiB))
        assert failed.value.errno == errno.ENOSPC
        assert not list((root / "data" / "ab").iterdir())
        backend.put("data/ab/y", b"y" * (2 * MiB))  # the space is free again
        assert backend.get("data/ab/y") == b"y" * (2 * MiB)


def test_whole_blocks_of_aligned_memory_go_without_a_copy() -> None:
    with mmap.mmap(-1, 3 * ALIGN) as aligned, memoryview(aligned) as view:
        assert directio._aligned_prefix(view[: 2 * ALIGN + 5]) == 2 * ALIGN
        assert directio._aligned_prefix(view[1 : 2 * ALIGN]) == 0  # not on a boundary
    assert directio._aligned_prefix(memoryview(bytes(3 * ALIGN))) == 0  # read-only
