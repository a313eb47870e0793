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
