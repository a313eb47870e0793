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
from blockbackup.repository.errors import NotFound
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


# -- reads past the page cache ---------------------------------------------------------------

OBJECT = 3 * MiB + 1234  # not a whole number of blocks
RANGES = [
    (0, directio.DIRECT_READ_MIN - 1),  # the longest buffered one
    (0, directio.DIRECT_READ_MIN),
    (1, directio.DIRECT_READ_MIN),  # neither end on a block boundary
    (ALIGN - 1, MiB + 2),
    (MiB, MiB),
    (OBJECT - directio.DIRECT_READ_MIN - 3, directio.DIRECT_READ_MIN),  # the last block
    (OBJECT - 100, directio.DIRECT_READ_MIN),  # past the end: what there is
    (OBJECT, directio.DIRECT_READ_MIN),  # at the end: nothing
    (OBJECT + ALIGN, directio.DIRECT_READ_MIN),  # beyond it: nothing
]


@pytest.fixture
def stored(tmp_path: Path) -> tuple[DirectoryBackend, bytes]:
    backend = DirectoryBackend(tmp_path)
    data = os.urandom(OBJECT)
    backend.put("data/ab/x", data)
    return backend, data


@pytest.mark.parametrize(("offset", "length"), RANGES)
def test_every_range_reads_exactly_what_a_buffered_read_gives(
    stored: tuple[DirectoryBackend, bytes], offset: int, length: int
) -> None:
    backend, data = stored
    got = backend.get_buffer("data/ab/x", offset, length)
    assert bytes(got) == data[offset : offset + length] == backend.get("data/ab/x", offset, length)


def test_reads_into_one_reused_buffer_give_the_same_bytes(
    stored: tuple[DirectoryBackend, bytes],
) -> None:
    backend, data = stored
    into = directio.ReadBuffer()
    for offset, length in RANGES:
        got = backend.get_buffer("data/ab/x", offset, length, into=into)
        assert bytes(got) == data[offset : offset + length]
    # A larger read than any before takes new memory; a view of the old stays as it was.
    small = backend.get_buffer("data/ab/x", 0, directio.DIRECT_READ_MIN, into=into)
    whole = backend.get_buffer("data/ab/x", into=into)
    assert bytes(small) == data[: directio.DIRECT_READ_MIN]
    assert bytes(whole) == data
    again = backend.get_buffer("data/ab/x", ALIGN + 1, MiB, into=into)  # reuses it
    assert bytes(again) == data[ALIGN + 1 : ALIGN + 1 + MiB]


def test_a_whole_object_reads_exactly(stored: tuple[DirectoryBackend, bytes]) -> None:
    backend, data = stored
    assert bytes(backend.get_buffer("data/ab/x")) == data
    assert bytes(backend.get_buffer("data/ab/x", 5)) == data[5:]
    backend.put("data/ab/small", b"s" * 100)  # too short to read directly
    assert backend.get_buffer("data/ab/small") == b"s" * 100
    with pytest.raises(NotFound):
        backend.get_buffer("data/ab/absent", 0, MiB)
    with pytest.raises(NotFound):
        backend.get_buffer("data/ab/absent")


def test_a_long_range_is_read_directly_and_a_short_one_buffered(
    stored: tuple[DirectoryBackend, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, _data = stored
    real_preadv = os.preadv
    direct: list[bool] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        direct.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    backend.get_buffer("data/ab/x", 7, MiB)
    assert direct
    assert all(direct)
    direct.clear()
    backend.get_buffer("data/ab/x", 7, directio.DIRECT_READ_MIN - 1)
    assert not direct  # read by a buffered file object, not preadv


@pytest.mark.parametrize("refused_at", ["open", "read"])
def test_a_file_system_that_refuses_direct_reads_gets_buffered_ones(
    stored: tuple[DirectoryBackend, bytes], monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    backend, data = stored
    real_open, real_preadv = os.open, os.preadv
    refused: list[str] = []

    def open_(path: str, flags: int, *args: int) -> int:
        if refused_at == "open" and flags & os.O_DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("read")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "preadv", preadv)
    assert bytes(backend.get_buffer("data/ab/x", 3, 2 * MiB)) == data[3 : 3 + 2 * MiB]
    assert bytes(backend.get_buffer("data/ab/x")) == data
    assert set(refused) == {refused_at}
