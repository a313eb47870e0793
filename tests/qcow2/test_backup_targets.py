"""Backups into qcow2 targets, judged by qemu-img: full, compressed, 2 MiB clusters, sync=top.

Backup targets live in qcow2 in the QEMU world, so each backup here runs through the library
API into a qcow2 node, then ``qemu-img check`` must find no errors or leaks and ``qemu-img
compare`` must find the target equal to the source at T0 (read with plain ``os.pread``
inside the quiesced section, while a writer rewrites the source during the job).
Incremental chains need persistent dirty bitmaps in jobs and are tested with them.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from blockbackup.api import BlockBackup
from blockbackup.block.driver import Status
from blockbackup.block.node import BlockNode
from blockbackup.block.qcow2.create import create_qcow2_file
from testkit.images import make_image, raw_node, read_file

sys.path.insert(0, str(Path(__file__).parent))
from qcow2_helpers import check_clean, needs_qemu, qcow2_opts, qemu_io, run

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu, needs_qemu]
MiB = 1 << 20
SIZE = 8 * MiB

#: Source layout: (offset, length, kind) with kind "data", "zero" (zero bytes stored in the
#: file) or a hole (anything not listed).
LAYOUT = [
    (0, MiB, "data"),
    (2 * MiB, MiB, "zero"),
    (4 * MiB, MiB, "data"),
    (6 * MiB + 65536, 65536, "data"),
]
SPARSE = [(MiB, MiB), (2 * MiB, MiB), (3 * MiB, MiB), (5 * MiB, MiB), (7 * MiB, MiB)]


def _source(path: Path, compressible: bool = False) -> Path:
    rng = random.Random(42)
    extents = []
    for offset, length, kind in LAYOUT:
        if kind == "zero":
            data = bytes(length)
        elif compressible:
            data = (b"blockbackup compresses this line %08d\n" % offset) * (length // 41 + 1)
            data = data[:length]
        else:
            data = rng.randbytes(length)
        extents.append((offset, data))
    return make_image(path, SIZE, extents)


async def _writer(node: BlockNode, t0: asyncio.Event, stop: asyncio.Event, done: list[int]) -> int:
    """Rewrite the source until told to stop; return the write count.

    Before T0 only the data regions are rewritten, so the source's holes and zero regions
    at T0 are exactly ``SPARSE``; after T0 anywhere (copy-before-write of holes).
    """
    rng = random.Random(3)
    data = [(o, n) for o, n, kind in LAYOUT if kind == "data"]
    count = 0
    while not stop.is_set() or count < 8:
        if t0.is_set():
            offset = rng.randrange(SIZE // 4096) * 4096
        else:
            start, length = rng.choice(data)
            offset = start + rng.randrange(length // 4096) * 4096
        await node.write(offset, rng.randbytes(4096))
        count += 1
        done[0] = count
        await asyncio.sleep(0)
    return count


async def _backup_with_writer(
    bb: BlockBackup, src: BlockNode, src_path: Path, **options: Any
) -> tuple[bytes, Any]:
    """Run a backup while a writer rewrites the source; return (source at T0, job)."""
    snapshot: list[bytes] = []

    t0 = asyncio.Event()
    done = [0]
    at_start: list[int] = []

    async def at_t0() -> None:
        snapshot.append(read_file(src_path))
        at_start.append(done[0])
        t0.set()

    stop = asyncio.Event()
    writer = asyncio.create_task(_writer(src, t0, stop, done))
    await asyncio.sleep(0)
    # Rate-limited so that the writer's writes land while the job copies.
    job = await bb.backup(src.name, "tgt", at_point_in_time=at_t0, speed=32 * MiB, **options)
    await bb.wait(job)
    during = done[0] - at_start[0]
    stop.set()
    await writer
    assert during >= 8, during
    assert read_file(src_path) != snapshot[0]  # the writer did change the source
    return snapshot[0], job


def _compare(tmp_path: Path, t0: bytes, target: Path) -> None:
    ref = tmp_path / "t0.raw"
    ref.write_bytes(t0)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", ref, target)


def _map(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(run("qemu-img", "map", "--output=json", path))
    return out


def _check_json(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run("qemu-img", "check", "--output=json", path))
    return out


async def _full_backup(tmp_path: Path, cluster_size: int, **options: Any) -> tuple[bytes, Path]:
    src_path = _source(tmp_path / "src.img", compressible=bool(options.get("compress")))
    tgt_path = tmp_path / "tgt.qcow2"
    create_qcow2_file(tgt_path, SIZE, cluster_size=cluster_size)
    async with BlockBackup() as bb:
        src = await bb.blockdev_add(raw_node("src", src_path))
        tgt = await bb.blockdev_add(qcow2_opts(tgt_path, "tgt"))
        assert tgt.cluster_size == cluster_size
        t0, job = await _backup_with_writer(bb, src, src_path, **options)
        assert job.block_copy.cluster_size == max(65536, cluster_size)
        assert job.progress_current == job.progress_total == SIZE
    check_clean(tgt_path)
    _compare(tmp_path, t0, tgt_path)
    return t0, tgt_path


async def test_full_backup_into_qcow2(tmp_path: Path) -> None:
    t0, tgt_path = await _full_backup(tmp_path, 65536)
    # Holes and zero regions of the source stay unallocated (or zero clusters) in the target.
    for entry in _map(tgt_path):
        start, end = entry["start"], entry["start"] + entry["length"]
        for offset, length in SPARSE:
            if start < offset + length and offset < end and entry["data"]:
                raise AssertionError(f"{entry} is data inside sparse region {offset}+{length}")
    # The target's file stores about the source's data, not its virtual size.
    data_bytes = sum(n for _, n, kind in LAYOUT if kind == "data")
    assert tgt_path.stat().st_blocks * 512 < data_bytes + 2 * MiB
    assert t0[2 * MiB : 3 * MiB] == bytes(MiB)


async def test_compressed_backup_into_qcow2(tmp_path: Path) -> None:
    _, tgt_path = await _full_backup(tmp_path, 65536, compress=True)
    info = _check_json(tgt_path)
    assert info.get("compressed-clusters", 0) > 0, info
    assert info.get("corruptions", 0) == 0, info
    assert info.get("leaks", 0) == 0, info


async def test_backup_into_2m_cluster_qcow2(tmp_path: Path) -> None:
    _, tgt_path = await _full_backup(tmp_path, 2 * MiB)
    assert _check_json(tgt_path)["check-errors"] == 0


async def _allocated_in_top(node: BlockNode) -> int:
    total, offset = 0, 0
    while offset < node.size:
        extent = await node.block_status(offset, node.size - offset)
        if extent.status & Status.ALLOCATED:
            total += extent.length
        offset = extent.end
    return total


async def test_sync_top_with_shared_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    tgt_path = tmp_path / "tgt.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "write -P 0x11 0 3M", "write -P 0x22 5M 2M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x33 1M 512k", "write -P 0x44 4M 64k", "write -z 6M 128k")
    qemu_io(top, "write -P 0x55 7M 4k")  # allocates a whole 64 KiB cluster of the top
    create_qcow2_file(tgt_path, SIZE, backing_file=str(base), backing_fmt="qcow2")
    async with BlockBackup() as bb:
        src = await bb.blockdev_add(qcow2_opts(top, "src"))
        tgt = await bb.blockdev_add(qcow2_opts(tgt_path, "tgt"))
        assert tgt.backing() is not None
        top_allocated = await _allocated_in_top(src)
        assert top_allocated == 512 * 1024 + 65536 + 128 * 1024 + 65536
        job = await bb.backup("src", "tgt", sync="top")
        await bb.wait(job)
        assert job.progress_total == top_allocated
        assert job.progress_current == top_allocated
    check_clean(tgt_path)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", top, tgt_path)
    # Only the top layer's clusters were copied: the rest of the target is unallocated.
    own = sum(e["length"] for e in _map(tgt_path) if e["depth"] == 0 and e["present"])
    assert own == top_allocated
