"""Persistent bitmaps: clean round trips (raw sidecar and qcow2), QEMU interop, sidecar
corruption (reported and loaded inconsistent, never silently used), clear and remove."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from blockbackup.api import BlockBackup
from blockbackup.block.bitmap_store import DURABLE_SPAN, store_of
from blockbackup.block.bitmap_store import sidecar as sc
from blockbackup.block.dirty_bitmap import bitmaps_of

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
SIZE = 4 << 20
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a qemu tool (sync helper: the tests call it between awaits)."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def _ok(*args: str | Path) -> None:
    res = _run(*args)
    assert res.returncode == 0, res.stdout + res.stderr


def _image(tmp: Path, fmt: str) -> Path:
    path = tmp / f"d.{fmt}"
    if fmt == "raw":
        path.write_bytes(bytes(SIZE))
    else:
        _ok("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    return path


def _opts(fmt: str, path: Path) -> dict[str, object]:
    return {"driver": fmt, "node-name": "d", "file": {"driver": "file", "filename": str(path)}}


def _state(bb: BlockBackup) -> dict[str, tuple[int, bool, bool, bytes]]:
    out = {}
    for bm in bitmaps_of(bb.graph.get("d")):
        assert bm.name is not None
        out[bm.name] = (bm.granularity, bm.recording, bm.inconsistent, bm.bitmap.to_bytes())
    return out


def _info(path: Path) -> list[dict[str, object]]:
    res = _run("qemu-img", "info", "-U", "--output=json", path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    bitmaps: list[dict[str, object]] = (
        data.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    )
    return bitmaps


@pytest.mark.parametrize("fmt", ["raw", pytest.param("qcow2", marks=needs_qemu)])
async def test_clean_round_trip(tmp_path: Path, fmt: str) -> None:
    path = _image(tmp_path, fmt)
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts(fmt, path))
        reg = bitmaps_of(node)
        reg.create("a", 65536, persistent=True)
        reg.create("b", 4096, persistent=True, disabled=True)
        reg.create("c", 512, persistent=True)
        reg.create("volatile", 65536)
        for off, n in [(0, 1), (70000, 5000), (3 << 20, 300000), (SIZE - 1, 1)]:
            await node.write(off, os.urandom(n))
        reg.get("b").enable()  # type: ignore[union-attr]
        await node.write(1 << 20, b"x" * 8192)
        reg.get("b").disable()  # type: ignore[union-attr]
        await node.write(2 << 20, b"y")
        before = {k: v for k, v in _state(bb).items() if k != "volatile"}
    if fmt == "qcow2":
        info = {b["name"]: b for b in _info(path)}
        assert info["a"]["granularity"] == 65536
        assert info["a"]["flags"] == ["auto"]
        assert info["b"]["granularity"] == 4096
        assert info["b"]["flags"] == []
        check = _run("qemu-img", "check", str(path))
        assert check.returncode == 0, check.stdout
    else:
        assert not (tmp_path / "d.qcow2.bbmap").exists()
        assert sc.read(str(path) + ".bbmap") is not None
    async with BlockBackup() as bb:
        await bb.blockdev_add(_opts(fmt, path))
        after = _state(bb)
        assert after == before
        assert all(bm.persistent for bm in bitmaps_of(bb.graph.get("d")))


@needs_qemu
async def test_qemu_made_bitmaps_load_and_ours_are_listed(tmp_path: Path) -> None:
    path = _image(tmp_path, "qcow2")
    _ok("qemu-img", "bitmap", "--add", "-g", "131072", str(path), "q0")
    _ok("qemu-img", "bitmap", "--add", "--disable", str(path), "q1")
    _ok("qemu-io", "-f", "qcow2", "-c", "write 256k 64k", str(path))
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("qcow2", path))
        q0, q1 = bitmaps_of(node).get("q0"), bitmaps_of(node).get("q1")
        assert q0 is not None
        assert q1 is not None
        assert q0.granularity == 131072
        assert q0.recording
        assert not q0.inconsistent
        assert not q1.recording
        assert q1.count == 0
        assert [s for s, _ in q0.runs()] == [262144]
        # while open read-write, QEMU sees the bitmaps in use
        assert all("in-use" in b["flags"] for b in _info(path))  # type: ignore[operator]
        bitmaps_of(node).create("ours", 65536, persistent=True)
        await node.write(0, b"z" * 512)
    info = {b["name"]: b for b in _info(path)}
    assert set(info) == {"q0", "q1", "ours"}
    assert info["ours"]["flags"] == ["auto"]
    assert info["ours"]["granularity"] == 65536
    assert info["q1"]["flags"] == []
    assert _run("qemu-img", "check", str(path)).returncode == 0
    # QEMU keeps tracking with our bitmap and can remove it.
    _ok("qemu-io", "-f", "qcow2", "-c", "write 1M 4k", str(path))
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("qcow2", path))
        ours = bitmaps_of(node).get("ours")
        assert ours is not None
        assert [s for s, _ in ours.runs()] == [0, 1 << 20]
        bitmaps_of(node).release(ours)
        store = store_of(node)
        assert store is not None
        await store.settle()
        assert {b["name"] for b in _info(path)} == {"q0", "q1"}
    _ok("qemu-img", "bitmap", "--remove", str(path), "q0")
    _ok("qemu-img", "bitmap", "--remove", str(path), "q1")
    assert _info(path) == []


async def _make_sidecar(tmp: Path) -> tuple[Path, Path]:
    path = _image(tmp, "raw")
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("raw", path))
        bitmaps_of(node).create("a", 4096, persistent=True)
        await node.write(0, b"x" * 100000)
    return path, Path(str(path) + ".bbmap")


def _corrupt_data(side: Path) -> None:
    data = bytearray(side.read_bytes())
    data[sc.BLOCK + 3] ^= 0xFF  # first data block
    side.write_bytes(bytes(data))


def _truncate(side: Path) -> None:
    side.write_bytes(side.read_bytes()[: sc.BLOCK + 100])


def _bad_version(side: Path) -> None:
    img = sc.read(str(side))
    assert img is not None
    img.version = 99
    side.write_bytes(sc.serialize(img))


@pytest.mark.parametrize("damage", [_corrupt_data, _truncate, _bad_version])
async def test_sidecar_corruption_is_reported_and_inconsistent(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    path, side = await _make_sidecar(tmp_path)
    damage(side)  # type: ignore[operator]
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("raw", path))
        bm = bitmaps_of(node).get("a")
        assert bm is not None
        assert bm.inconsistent
        assert not bm.recording
        assert bm.info()["inconsistent"] is True
        store = store_of(node)
        assert store is not None
        assert store.load_errors
        with pytest.raises(Exception, match="inconsistent"):
            bm.check_usable()
    assert "bitmap 'a'" in caplog.text
    # stays inconsistent after a clean close until removed
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("raw", path))
        bm = bitmaps_of(node).get("a")
        assert bm is not None
        assert bm.inconsistent
        bitmaps_of(node).release(bm)
    assert not side.exists()


async def test_bad_header_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, side = await _make_sidecar(tmp_path)
    data = bytearray(side.read_bytes())
    data[50] ^= 1
    side.write_bytes(bytes(data))
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("raw", path))
        assert len(bitmaps_of(node)) == 0
        store = store_of(node)
        assert store is not None
        assert "checksum" in store.load_errors[0]
    assert side.exists()  # never deleted: it is evidence, not ours to drop


async def test_clear_shrinks_the_durable_copy(tmp_path: Path) -> None:
    path = _image(tmp_path, "raw")
    side = str(path) + ".bbmap"
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("raw", path))
        bm = bitmaps_of(node).create("a", 65536, persistent=True)
        await node.write(0, b"x" * 200000)
        img = sc.read(side)
        assert img is not None
        assert not img.flags & sc.FLAG_CLEAN
        assert img.entries[0].data is not None
        assert img.entries[0].data[:2] == b"\xff\xff"  # durable in 1 MiB spans
        bm.clear()
        await node.write(1 << 20, b"y")
        store = store_of(node)
        assert store is not None
        await store.settle()
        img = sc.read(side)
        assert img is not None
        assert img.entries[0].data is not None
        assert img.entries[0].data[:2] == b"\0\0"
        assert img.entries[0].data[2] & 1  # granule 16 (1 MiB), with or without its span
    img = sc.read(side)
    assert img is not None
    assert img.flags & sc.FLAG_CLEAN
    assert img.entries[0].data is not None
    assert img.entries[0].data[:4] == b"\0\0\1\0"  # exact after a clean close


async def test_unsupported_nodes_keep_qemus_error(tmp_path: Path) -> None:
    async with BlockBackup() as bb:
        node = await bb.blockdev_add({"driver": "null-co", "node-name": "n", "size": 1 << 20})
        with pytest.raises(Exception, match="Can't store persistent bitmaps to n: Operation not"):
            bitmaps_of(node).create("p", persistent=True)


async def test_write_now_only_once_the_span_is_durable(tmp_path: Path) -> None:
    """The NBD server's inline writes keep working with a persistent bitmap: a write whose
    span is durable goes at once (and is recorded), one that needs a commit waits for it."""
    path = tmp_path / "big.raw"
    path.write_bytes(bytes(4 * DURABLE_SPAN))  # several durable spans
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("raw", path))
        bitmap = bitmaps_of(node).create("a", 65536, persistent=True)
        assert not node.write_now(0, b"\x01" * 4096)  # clean span: the commit comes first
        assert bitmap.bitmap.dirty_bytes() == 0  # and nothing was recorded by the refusal
        await node.write(0, b"\x01" * 4096)  # commits the span
        assert node.write_now(65536, b"\x02" * 4096)  # same durable span: at once
        assert bitmap.bitmap.next_dirty_area(65536, 2 * 65536, 65536) == (65536, 65536)
        last = 4 * DURABLE_SPAN - 4096
        assert not node.write_now(last, b"\x03" * 4096)  # another span: not durable yet
    data = path.read_bytes()
    assert data[:4096] == b"\x01" * 4096
    assert data[65536 : 65536 + 4096] == b"\x02" * 4096


async def test_write_now_sees_every_way_a_span_stops_being_durable(tmp_path: Path) -> None:
    """The inline path's cache of durable spans never outlives what made them durable: a
    clear, a new persistent bitmap, and a disabled bitmap enabled again each send the next
    write to a cleared span back to the commit."""
    path = tmp_path / "big.raw"
    path.write_bytes(bytes(2 * DURABLE_SPAN))
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(_opts("raw", path))
        store = store_of(node)
        assert store is not None
        a = bitmaps_of(node).create("a", 65536, persistent=True)
        await node.write(0, b"\x01" * 4096)
        assert node.write_now(8192, b"\x01" * 4096)  # durable: at once

        a.clear()  # the commit that shrinks the log takes the span away
        await store.settle()
        assert not node.write_now(8192, b"\x02" * 4096)
        await node.write(8192, b"\x02" * 4096)
        assert node.write_now(8192, b"\x02" * 4096)

        b = bitmaps_of(node).create("b", 65536, persistent=True)  # durable nowhere yet
        assert not node.write_now(8192, b"\x03" * 4096)
        await node.write(8192, b"\x03" * 4096)
        assert node.write_now(8192, b"\x03" * 4096)

        b.disable()
        b.clear()  # a shrink: every lineage is back to its exact bits
        await store.settle()
        assert not node.write_now(16384, b"\x04" * 4096)
        await node.write(16384, b"\x04" * 4096)  # durable again for "a" only
        assert node.write_now(16384, b"\x04" * 4096)  # "b" records nothing: no commit
        b.enable()
        assert not node.write_now(16384, b"\x05" * 4096)
        await node.write(16384, b"\x05" * 4096)
        assert node.write_now(16384, b"\x05" * 4096)
        assert b.bitmap.next_dirty_area(0, DURABLE_SPAN, 65536) == (0, 65536)
    img = sc.read(str(path) + ".bbmap")
    assert img is not None
    assert [e.name for e in img.entries] == ["a", "b"]
