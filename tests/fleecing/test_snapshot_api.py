"""The copy-before-write snapshot API and snapshot-access, in-process.

Why: these are the rules fleecing rests on (point-in-time reads, reads holding off guest
writes, bitmap-limited views, discard, on-cbw-error), checked against plain file contents
with no NBD in the way; tests/fleecing/test_fleecing_nbd.py repeats the recipes with real
NBD clients.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from blockbackup.api import BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of, find_bitmap
from blockbackup.block.driver import Status
from blockbackup.block.node import BlockNode
from blockbackup.block.qcow2.create import create_qcow2_file
from blockbackup.errors import BlockBackupError
from fleecing.fleece_kit import CLUSTER, SIZE, MiB, fleece, t0_data
from testkit.images import allocated_bytes, make_image, raw_node, read_file

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_snapshot_reads_point_in_time(tmp_path: Path) -> None:
    async with fleece(tmp_path) as f:
        writes = [(0, 4096), (CLUSTER + 100, 3 * CLUSTER), (SIZE // 2 + 5, 70000), (SIZE - 10, 10)]
        for off, n in writes:
            await f.cbw.write(off, b"\xee" * n)
        await f.cbw.write_zeroes(SIZE - 4 * CLUSTER, 2 * CLUSTER)
        await f.cbw.discard(3 * MiB, CLUSTER)
        assert bytes(await f.acc.read(0, SIZE)) == f.t0
        # unaligned reads straddling copied and not-copied clusters
        for off, n in [(CLUSTER - 7, 20), (5 * CLUSTER - 3, 2 * CLUSTER + 9), (SIZE - 1, 1)]:
            assert bytes(await f.acc.read(off, n)) == f.t0[off : off + n]
        src = read_file(f.src_path)
        assert src[:4096] == b"\xee" * 4096
        # the temporary image holds exactly the copied clusters
        tmp = read_file(f.tmp_path)
        assert tmp[:CLUSTER] == f.t0[:CLUSTER]
        assert tmp[8 * CLUSTER : 9 * CLUSTER] == bytes(CLUSTER)  # never copied


async def test_snapshot_is_never_read_at_once(tmp_path: Path) -> None:
    """``read_now`` (the NBD server's task-free READ) stops at snapshot-access: reading
    it at once would bypass the point in time (tmp's copies, the snapshot's holes and
    errors). The cbw node's own reads are the source's, changed in nothing: forwarded."""
    async with fleece(tmp_path) as f:
        await f.src.read(0, CLUSTER)  # cached: the raw/file source alone would answer
        assert f.src.read_now(0, CLUSTER) == f.t0[:CLUSTER]
        assert f.acc.read_now(0, CLUSTER) is None
        await f.cbw.write(0, b"\x01" * 4096)  # copied to tmp: the view and the source differ
        assert f.acc.read_now(0, CLUSTER) is None
        assert bytes(f.cbw.read_now(0, 4096) or b"") == b"\x01" * 4096


async def test_snapshot_block_status(tmp_path: Path) -> None:
    async with fleece(tmp_path) as f:
        await f.cbw.write(SIZE // 2, b"\x01" * 4096)  # data over the zero region
        ext = await f.acc.block_status(SIZE // 2, CLUSTER)
        assert ext.status & Status.ZERO
        assert ext.status & Status.ALLOCATED
        ext = await f.acc.block_status(0, SIZE)
        assert ext.status & Status.DATA
        assert not ext.status & Status.ZERO


async def test_guest_write_waits_for_source_reader(tmp_path: Path) -> None:
    async with fleece(tmp_path) as f:
        # A snapshot read from the source is in flight over cluster 3.
        req = f.filter._source_readers.add(3 * CLUSTER, CLUSTER)
        write = asyncio.create_task(f.cbw.write(3 * CLUSTER + 10, b"\x77" * 10))
        try:
            async with asyncio.timeout(10):
                while not f.filter.done.get(3 * CLUSTER):  # the copy is made...
                    await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            assert not write.done()  # ...but the write waits for the reader
            assert read_file(f.src_path)[3 * CLUSTER + 10] == f.t0[3 * CLUSTER + 10]
        finally:
            f.filter._source_readers.remove(req)
        await write
        assert bytes(await f.acc.read(3 * CLUSTER, CLUSTER)) == f.t0[3 * CLUSTER : 4 * CLUSTER]


async def test_concurrent_reads_and_writes_stay_consistent(tmp_path: Path) -> None:
    async with fleece(tmp_path) as f:

        async def writer(seed: int) -> None:
            for i in range(40):
                off = ((seed * 7919 + i * 104729) % (SIZE // 512)) * 512
                await f.cbw.write(off, bytes([seed + 1]) * min(4096, SIZE - off))

        async def reader() -> None:
            for i in range(40):
                off = (i * 65537) % (SIZE - 3 * CLUSTER)
                n = 3 * CLUSTER
                assert bytes(await f.acc.read(off, n)) == f.t0[off : off + n]

        async with asyncio.TaskGroup() as tg:
            for s in range(4):
                tg.create_task(writer(s))
            for _ in range(3):
                tg.create_task(reader())
        assert bytes(await f.acc.read(0, SIZE)) == f.t0


async def test_discard_frees_temp_and_ends_cbw(tmp_path: Path) -> None:
    async with fleece(tmp_path) as f:
        await f.cbw.write(0, b"\x55" * MiB)  # copies the first MiB to tmp
        await f.tmp.flush()
        before = allocated_bytes(f.tmp_path)
        assert before >= MiB
        await f.acc.discard(0, MiB)
        assert allocated_bytes(f.tmp_path) <= before - MiB
        with pytest.raises(OSError, match="Permission denied") as exc:
            await f.acc.read(CLUSTER, 10)
        assert exc.value.errno == errno.EACCES
        with pytest.raises(OSError, match="Permission denied") as exc:
            await f.acc.block_status(0, CLUSTER)
        assert exc.value.errno == errno.EACCES
        # no copy-before-write any more there: a write of a not yet copied discarded
        # cluster leaves tmp alone
        await f.acc.discard(MiB, CLUSTER)
        await f.cbw.write(MiB, b"\x66" * CLUSTER)
        assert read_file(f.tmp_path)[MiB : MiB + CLUSTER] == bytes(CLUSTER)
        # the rest is still the point in time; unaligned discards shrink inward
        await f.acc.discard(2 * MiB + 1, CLUSTER)
        assert (
            bytes(await f.acc.read(2 * MiB, 2 * CLUSTER)) == f.t0[2 * MiB : 2 * MiB + 2 * CLUSTER]
        )


async def test_bitmap_limits_copy_and_view(tmp_path: Path) -> None:
    def dirty_b0(src: BlockNode) -> None:
        b0 = bitmaps_of(src).create("b0", 4096, disabled=True)
        b0.bitmap.set(2 * CLUSTER, 2 * CLUSTER)
        b0.bitmap.set(MiB, 4096)  # rounds out to one cluster at cbw granularity

    cbw_opts = {"bitmap": {"node": "src", "name": "b0"}}
    async with fleece(tmp_path, cbw_opts=cbw_opts, prepare_source=dirty_b0) as f:
        await f.cbw.write(0, b"\x11" * (MiB + CLUSTER))
        tmp = read_file(f.tmp_path)
        assert tmp[2 * CLUSTER : 4 * CLUSTER] == f.t0[2 * CLUSTER : 4 * CLUSTER]
        assert tmp[MiB : MiB + CLUSTER] == f.t0[MiB : MiB + CLUSTER]
        assert tmp[:CLUSTER] == bytes(CLUSTER)  # outside the bitmap: not protected
        assert bytes(await f.acc.read(2 * CLUSTER, 2 * CLUSTER)) == f.t0[2 * CLUSTER : 4 * CLUSTER]
        for off in (0, 5 * CLUSTER, MiB + CLUSTER):
            with pytest.raises(OSError, match="Permission denied") as exc:
                await f.acc.read(off, 512)
            assert exc.value.errno == errno.EACCES
    with pytest.raises(BlockBackupError, match="Dirty bitmap 'nope' not found"):
        async with fleece(tmp_path / "..", cbw_opts={"bitmap": {"node": "src", "name": "nope"}}):
            pass


async def test_bitmaps_belong_to_their_graph(tmp_path: Path) -> None:
    """Two graphs in one process: a node of one never finds the bitmaps of the other."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def dirty_b0(src: BlockNode) -> None:
        bitmaps_of(src).create("b0", 4096, disabled=True).bitmap.set(0, CLUSTER)

    cbw_opts = {"bitmap": {"node": "src", "name": "b0"}}
    async with fleece(tmp_path / "a", prepare_source=dirty_b0) as a:
        assert find_bitmap(a.src, "b0") is not None
        with pytest.raises(BlockBackupError, match="Dirty bitmap 'b0' not found"):
            async with fleece(tmp_path / "b", cbw_opts=cbw_opts):
                pass
        async with fleece(tmp_path / "b", cbw_opts=cbw_opts, prepare_source=dirty_b0) as b:
            assert find_bitmap(b.src, "b0") is not find_bitmap(a.src, "b0")
            assert a.bb.graph.bitmaps is not b.bb.graph.bitmaps
            assert a.bb.graph.bitmap_stores is not b.bb.graph.bitmap_stores


def _debug_tmp(path: Path) -> dict[str, object]:
    return {"driver": "blkdebug", "node-name": "tmp", "image": raw_node("tmp-raw", path)}


async def test_break_guest_write(tmp_path: Path) -> None:
    tmp = make_image(tmp_path / "dbg.img", SIZE)
    async with fleece(tmp_path, tmp_node=_debug_tmp(tmp)) as f:
        debug = f.tmp.driver
        rule = debug.add_rule("write", errno.EIO)  # type: ignore[attr-defined]
        with pytest.raises(OSError, match="Input/output error") as exc:
            await f.cbw.write(0, b"\x99" * 512)
        assert exc.value.errno == errno.EIO
        assert read_file(f.src_path)[:512] == f.t0[:512]  # the guest write did not happen
        debug.remove_rule(rule)  # type: ignore[attr-defined]
        await f.cbw.write(0, b"\x99" * 512)  # retried: copied now
        assert bytes(await f.acc.read(0, CLUSTER)) == f.t0[:CLUSTER]


async def test_break_snapshot(tmp_path: Path) -> None:
    tmp = make_image(tmp_path / "dbg.img", SIZE)
    opts = {"on-cbw-error": "break-snapshot"}
    async with fleece(tmp_path, tmp_node=_debug_tmp(tmp), cbw_opts=opts) as f:
        f.tmp.driver.add_rule("write", errno.EIO)  # type: ignore[attr-defined]
        await f.cbw.write(0, b"\x99" * 512)  # the guest write goes on
        assert read_file(f.src_path)[:512] == b"\x99" * 512
        assert f.filter.broken.is_set()
        for off in (0, 2 * MiB):  # the whole snapshot is gone
            with pytest.raises(OSError, match="Permission denied") as exc:
                await f.acc.read(off, 512)
            assert exc.value.errno == errno.EACCES


async def test_push_backup_from_snapshot_access(tmp_path: Path) -> None:
    async with fleece(tmp_path) as f:
        tgt_path = make_image(tmp_path / "tgt.img", SIZE)
        await f.bb.blockdev_add(raw_node("tgt", tgt_path))
        await f.cbw.write(0, b"\x42" * MiB)
        job = await f.bb.backup("acc", "tgt", sync="full")
        writes = [
            asyncio.create_task(f.cbw.write(o, b"\x43" * 4096)) for o in range(0, SIZE, MiB // 2)
        ]
        await f.bb.wait(job)
        await asyncio.gather(*writes)
        assert read_file(tgt_path) == f.t0


async def test_push_backup_discard_source_empties_temp(tmp_path: Path) -> None:
    async with fleece(tmp_path) as f:
        tgt_path = make_image(tmp_path / "tgt.img", SIZE)
        await f.bb.blockdev_add(raw_node("tgt", tgt_path))
        await f.cbw.write(0, b"\x42" * 2 * MiB)  # 2 MiB of old data in tmp
        await f.tmp.flush()
        assert allocated_bytes(f.tmp_path) >= 2 * MiB
        job = await f.bb.backup("acc", "tgt", sync="full", discard_source=True)
        assert job.block_copy.discard_source
        await f.bb.wait(job)
        assert read_file(tgt_path) == f.t0
        assert allocated_bytes(f.tmp_path) == 0
        # and no copy-before-write into tmp any more
        await f.cbw.write(3 * MiB, b"\x44" * MiB)
        assert allocated_bytes(f.tmp_path) == 0
        with pytest.raises(OSError, match="Permission denied"):
            await f.acc.read(0, 512)


async def test_classic_fleecing_zero_clusters(tmp_path: Path) -> None:
    """sync=none into a qcow2 overlay backed by the source: zeroes of T0 must be written
    into the overlay, not skipped because the overlay reads the (still zero) source."""
    t0 = t0_data()
    hole = (SIZE // 2, SIZE // 2 + MiB)  # left a hole in the file: block status "zero"
    src_path = make_image(
        tmp_path / "src.img", SIZE, [(0, t0[: hole[0]]), (hole[1], t0[hole[1] :])]
    )
    ovl = tmp_path / "ovl.qcow2"
    create_qcow2_file(ovl, SIZE, backing_file=str(src_path), backing_fmt="raw")
    async with BlockBackup() as bb:
        await bb.blockdev_add(raw_node("src", src_path))
        ovl_node = await bb.blockdev_add(
            {
                "driver": "qcow2",
                "node-name": "ovl",
                "file": {"driver": "file", "filename": str(ovl)},
                "backing": "src",
            }
        )
        job = await bb.backup("src", "ovl", sync="none")
        src = bb.graph.get("src")
        assert (await src.block_status(hole[0], MiB)).status & Status.ZERO
        await src.write(0, b"\x01" * SIZE)  # rewrite everything, zero region included
        assert bytes(await ovl_node.read(0, SIZE)) == t0
        await job.cancel()
        await bb.jobs.wait_concluded(job)
