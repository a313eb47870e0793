"""File-to-file copies in one blocking call: exact content, zero pieces, which side failed."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from blockbackup.block.copy_range import SourceReadError, copy_through_buffer, start_writeback

PIECE = 64 * 1024


def _files(tmp_path: Path, data: bytes, old: bytes) -> tuple[int, int]:
    (tmp_path / "src").write_bytes(data)
    (tmp_path / "dst").write_bytes(old)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR)
    return src, dst


def test_copies_data_and_skips_zero_pieces(tmp_path: Path) -> None:
    data = bytearray(os.urandom(10 * PIECE + 123))
    data[2 * PIECE : 5 * PIECE] = bytes(3 * PIECE)  # three zero pieces in a row: one run
    data[7 * PIECE : 8 * PIECE] = bytes(PIECE)
    old = b"\xaa" * len(data)
    src, dst = _files(tmp_path, bytes(data), old)
    buffer = mmap.mmap(-1, PIECE)
    try:
        skipped = copy_through_buffer(src, 0, dst, 0, len(data), buffer, bytes(PIECE))
    finally:
        os.close(src)
        os.close(dst)
        buffer.close()  # raises BufferError if a view of it was left behind
    assert skipped == [(2 * PIECE, 3 * PIECE), (7 * PIECE, PIECE)]
    out = (tmp_path / "dst").read_bytes()
    for start, length in skipped:  # not written: the caller zeroes them its own way
        assert out[start : start + length] == old[start : start + length]
        out = out[:start] + bytes(length) + out[start + length :]
    assert out == data


def test_offsets_on_both_sides(tmp_path: Path) -> None:
    data = os.urandom(4 * PIECE)
    src, dst = _files(tmp_path, data, bytes(8 * PIECE))
    buffer = mmap.mmap(-1, PIECE)
    try:
        skipped = copy_through_buffer(src, PIECE, dst, 5 * PIECE, 2 * PIECE, buffer, bytes(PIECE))
        assert skipped == []
    finally:
        os.close(src)
        os.close(dst)
    out = (tmp_path / "dst").read_bytes()
    assert out[5 * PIECE : 7 * PIECE] == data[PIECE : 3 * PIECE]
    assert out[: 5 * PIECE] == bytes(5 * PIECE)


def test_read_failure_is_told_apart(tmp_path: Path) -> None:
    src = os.open(tmp_path, os.O_RDONLY)  # a directory: read() fails with EISDIR
    (tmp_path / "dst").write_bytes(bytes(PIECE))
    dst = os.open(tmp_path / "dst", os.O_RDWR)
    try:
        with pytest.raises(SourceReadError) as info:
            copy_through_buffer(src, 0, dst, 0, PIECE, mmap.mmap(-1, PIECE), bytes(PIECE))
    finally:
        os.close(src)
        os.close(dst)
    assert info.value.errno == errno.EISDIR


def test_write_failure_is_a_plain_oserror(tmp_path: Path) -> None:
    src, dst = _files(tmp_path, os.urandom(PIECE), bytes(PIECE))
    os.close(dst)
    dst = os.open(tmp_path / "dst", os.O_RDONLY)  # writes fail with EBADF
    try:
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            copy_through_buffer(src, 0, dst, 0, PIECE, mmap.mmap(-1, PIECE), bytes(PIECE))
    finally:
        os.close(src)
        os.close(dst)
    assert not isinstance(info.value, SourceReadError)
    assert info.value.errno == errno.EBADF


def test_writeback_is_started_and_advisory(tmp_path: Path) -> None:
    data = os.urandom(4 * PIECE)
    src, dst = _files(tmp_path, data, bytes(4 * PIECE))
    buffer = mmap.mmap(-1, PIECE)
    try:
        copy_through_buffer(src, 0, dst, 0, 4 * PIECE, buffer, bytes(PIECE), writeback=True)
        assert os.pread(dst, 4 * PIECE, 0) == data
        assert start_writeback(dst, 0, 4 * PIECE)  # a regular file: the kernel takes it
    finally:
        os.close(src)
        os.close(dst)
    read_end, write_end = os.pipe()
    try:
        assert not start_writeback(write_end, 0, PIECE)  # ESPIPE: ignored, advisory
    finally:
        os.close(read_end)
        os.close(write_end)


def _sparse_file(path: Path, size: int, grains: dict[int, bytes]) -> None:
    """A file of ``size`` bytes: holes except the ``grains`` (offset -> data) written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in grains.items():
            f.seek(offset)
            f.write(data)


def _data_runs(path: Path) -> list[tuple[int, int]]:
    """The file's data extents by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, runs, pos = os.fstat(fd).st_size, [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end - start))
            pos = end
        return runs
    finally:
        os.close(fd)


def test_grains_mix_data_source_holes_and_zero_data(tmp_path: Path) -> None:
    """Per-grain: data grains are written, source holes are not read or written, and data
    that reads as zeroes is not written either; all come back as merged runs."""
    grain, piece = 16 * 1024, 64 * 1024
    size = 8 * piece
    a, b, c = os.urandom(grain), os.urandom(2 * grain), os.urandom(grain)
    grains = {grain: a, 3 * piece: b, 3 * piece + 3 * grain: bytes(grain), 7 * piece + grain: c}
    _sparse_file(tmp_path / "src", size, grains)
    _sparse_file(tmp_path / "dst", size, {})
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR)
    buffer = mmap.mmap(-1, piece)
    try:
        skipped = copy_through_buffer(
            src, 0, dst, 0, size, buffer, bytes(piece), grain=grain, holes_read_zero=False
        )
    finally:
        os.close(src)
        os.close(dst)
        buffer.close()
    assert skipped == [
        (0, grain),
        (2 * grain, 3 * piece - 2 * grain),
        (3 * piece + 2 * grain, 4 * piece - 2 * grain + grain),
        (7 * piece + 2 * grain, piece - 2 * grain),
    ]
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()
    written = _data_runs(tmp_path / "dst")
    assert sum(n for _, n in written) <= 4 * grain + 3 * 4096  # the data grains, no more


def test_holes_read_zero_returns_only_runs_where_the_target_has_data(tmp_path: Path) -> None:
    grain, piece = 16 * 1024, 64 * 1024
    _sparse_file(tmp_path / "src", 4 * piece, {piece: os.urandom(grain)})
    _sparse_file(tmp_path / "dst", 4 * piece, {})
    _sparse_file(tmp_path / "old", 4 * piece, {0: b"\x01" * 4 * piece})
    _sparse_file(tmp_path / "half", 4 * piece, {3 * piece: b"\x01" * piece})
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR)
    old = os.open(tmp_path / "old", os.O_RDWR)
    half = os.open(tmp_path / "half", os.O_RDWR)
    buffer = mmap.mmap(-1, piece)
    try:
        args = (buffer, bytes(piece))
        fresh = copy_through_buffer(
            src, 0, dst, 0, 4 * piece, *args, grain=grain, holes_read_zero=True
        )
        used = copy_through_buffer(
            src, 0, old, 0, 4 * piece, *args, grain=grain, holes_read_zero=True
        )
        partly = copy_through_buffer(
            src, 0, half, 0, 4 * piece, *args, grain=grain, holes_read_zero=True
        )
    finally:
        for fd in (src, dst, old, half):
            os.close(fd)
        buffer.close()
    assert fresh == []  # the target's holes already read as zeroes
    assert used == [(0, piece), (piece + grain, 3 * piece - grain)]  # these need zeroing
    assert partly == [(piece + grain, 3 * piece - grain)]  # it has data in its last piece
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()
