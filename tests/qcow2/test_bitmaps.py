"""The bitmaps extension: bitmaps made by ``qemu-img bitmap`` are listed and loaded, and a
read-write open marks enabled bitmaps in use (they are not kept in sync by this driver)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from blockbackup.block.graph import Graph
from blockbackup.block.qcow2.bitmaps import load_bitmap_bytes, read_directory
from blockbackup.block.qcow2.driver import Qcow2Driver

sys.path.insert(0, str(Path(__file__).parent))
from qcow2_helpers import needs_qemu, qcow2_opts, qemu_io, run

pytestmark = [pytest.mark.qemu, needs_qemu]


@pytest.mark.asyncio
async def test_read_and_mark_bitmaps(tmp_path: Path, graph: Graph) -> None:
    img = tmp_path / "b.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    run("qemu-img", "bitmap", "--add", "-g", "65536", img, "b0")
    run("qemu-img", "bitmap", "--add", "--disable", img, "b1")
    qemu_io(img, "write -P 1 128k 64k")  # b0 is enabled: QEMU marks 128k..192k
    node = await graph.add(qcow2_opts(img, **{"read-only": True}))
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    bms = await read_directory(drv.file, drv.hdr)
    assert [b.name for b in bms] == ["b0", "b1"]
    assert bms[0].auto
    assert not bms[1].auto
    assert bms[0].granularity == 65536
    data = await load_bitmap_bytes(drv.file, drv.hdr, bms[0])
    assert data[0] == 0b100
    await graph.delete("q")
    node = await graph.add(qcow2_opts(img))
    await node.write(0, b"x" * 512)  # b0 is enabled: we track it too
    assert "in-use" in run("qemu-img", "info", "-U", img)  # while open read-write
    await graph.delete("q")
    assert "in-use" not in run("qemu-img", "info", img)  # stored at a clean close
    node = await graph.add(qcow2_opts(img, **{"read-only": True}))
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    bms = await read_directory(drv.file, drv.hdr)
    data = await load_bitmap_bytes(drv.file, drv.hdr, bms[[b.name for b in bms].index("b0")])
    assert data[0] == 0b101  # QEMU's mark at 128k and ours at 0
