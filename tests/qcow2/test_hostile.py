"""Hostile images: refused with BlockBackupError at open or OSError(EIO/EINVAL) at I/O
time; never a hang, a crash or an unbounded allocation. Header and table parsing is fuzzed."""

from __future__ import annotations

import asyncio
import errno
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockbackup.block.graph import Graph
from blockbackup.block.qcow2.create import build_image, create_qcow2_file
from blockbackup.errors import BlockBackupError

OK_ERRNOS = {errno.EIO, errno.EINVAL, errno.ENOSPC, errno.EFBIG}


def _base_image() -> bytearray:
    img = bytearray(build_image(1 << 20, cluster_size=512))
    return img


async def _exercise(path: Path, write: bool) -> None:
    g = Graph()
    try:
        opts = {
            "driver": "qcow2",
            "node-name": "q",
            "file": {"driver": "file", "filename": str(path)},
        }
        if not write:
            opts["read-only"] = True
        node = await g.add(opts)
        n = min(node.size, 64 << 10)
        if n:
            await node.read(0, n)
            await node.block_status(0, n)
            if write:
                await node.write(0, b"x" * min(n, 5000))
                await node.flush()
    finally:
        await g.aclose()


def _run_expect_clean_error(path: Path, write: bool) -> None:
    errno_seen = None
    try:
        asyncio.run(asyncio.wait_for(_exercise(path, write), 10))
    except BlockBackupError:
        pass
    except OSError as err:
        errno_seen = err.errno
    assert errno_seen is None or errno_seen in OK_ERRNOS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 4 * 512 - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    write=st.booleans(),
)
def test_fuzz_header_and_tables(mutations: list[tuple[int, int]], write: bool) -> None:
    img = _base_image()
    for pos, value in mutations:
        img[pos] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.qcow2"
        path.write_bytes(img)
        _run_expect_clean_error(path, write)


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(data)


async def _open(path: Path, **extra: object) -> None:
    g = Graph()
    try:
        node = await g.add(
            {
                "driver": "qcow2",
                "node-name": "q",
                "file": {"driver": "file", "filename": str(path)},
                **extra,
            }
        )
        await node.read(0, node.size)
    finally:
        await g.aclose()


@pytest.mark.asyncio
async def test_l1_offset_past_eof(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create_qcow2_file(p, 1 << 20)
    _patch(p, 40, ">Q", 1 << 40)
    with pytest.raises(BlockBackupError, match="past the end"):
        await _open(p)


@pytest.mark.asyncio
async def test_huge_l1_size(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create_qcow2_file(p, 1 << 20)
    _patch(p, 36, ">I", 0xFFFFFFFF)
    with pytest.raises(BlockBackupError, match="L1 table too large"):
        await _open(p)


@pytest.mark.asyncio
async def test_unknown_incompatible_feature(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create_qcow2_file(p, 1 << 20)
    _patch(p, 72, ">Q", 1 << 40)
    with pytest.raises(BlockBackupError, match="Unsupported qcow2 feature"):
        await _open(p)


@pytest.mark.asyncio
async def test_extended_l2_and_data_file_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create_qcow2_file(p, 1 << 20)
    _patch(p, 72, ">Q", 1 << 4)
    with pytest.raises(BlockBackupError, match="extended L2"):
        await _open(p)
    _patch(p, 72, ">Q", 1 << 2)
    with pytest.raises(BlockBackupError, match="external data file"):
        await _open(p)


@pytest.mark.asyncio
async def test_backing_loop(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2_file(a, 1 << 20, backing_file="b.qcow2", backing_fmt="qcow2")
    create_qcow2_file(b, 1 << 20, backing_file="a.qcow2", backing_fmt="qcow2")
    with pytest.raises(BlockBackupError, match="Loop"):
        await _open(a)
    c = tmp_path / "c.qcow2"
    create_qcow2_file(c, 1 << 20, backing_file="c.qcow2")
    with pytest.raises(BlockBackupError, match="Loop"):
        await _open(c)


@pytest.mark.asyncio
async def test_l2_entry_outside_file(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create_qcow2_file(p, 1 << 20, cluster_size=512)
    g = Graph()
    try:
        node = await g.add(
            {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(p)}}
        )
        await node.write(0, b"a" * 512)
    finally:
        await g.aclose()
    data = bytearray(p.read_bytes())
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2_off, (1 << 63) | (1 << 45))
    p.write_bytes(data)
    with pytest.raises(OSError, match="past the end") as info:
        await _open(p, **{"read-only": True})
    assert info.value.errno == errno.EIO


@pytest.mark.asyncio
async def test_options_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create_qcow2_file(p, 1 << 20)
    with pytest.raises(BlockBackupError, match="data-file"):
        await _open(p, **{"data-file": "x"})
    with pytest.raises(BlockBackupError, match="Encrypted"):
        await _open(p, encrypt={"format": "luks"})
    await _open(
        p, backing=None, **{"lazy-refcounts": True, "cache-size": 1 << 20, "overlap-check": "all"}
    )
