"""Backups with bitmaps: every sync x bitmap-mode, with and without an injected failure.

Each test: a bitmap records writes W1 (set D) before the backup; writes W2 (set S) land
during it; a blkdebug rule may fail the target at a cluster of D. Then the bitmap must be
exactly what the mode says (never losing S), and a successful incremental target, applied
over the previous full backup, must equal the source at T0.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from blockbackup.api import BackupFailed, BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.block.driver import WriteFlags
from blockbackup.block.drivers.blkdebug import BlkdebugDriver, IOType
from blockbackup.errors import BlockBackupError
from blockbackup.jobs.backup import BackupPerf
from testkit.backup_env import Env
from testkit.images import make_image, raw_node, read_file

pytestmark = pytest.mark.asyncio
K64 = 65536
MiB = 1 << 20
D_OFFSETS = [0, 5 * K64, 6 * K64, 20 * K64 + 100]  # clusters 0, 5, 6, 20 (two 4K granules)
S_OFFSETS = [40 * K64, 50 * K64 + 4096]  # written during the job
FAIL_AT = 20 * K64


def clusters(bm_offsets: list[int], gran: int) -> set[int]:
    return {o // gran for o in bm_offsets}


def granules_of(env: Env, name: str) -> set[int]:
    bm = bitmaps_of(env.src).get(name)
    assert bm is not None
    return {s // bm.granularity for s, n in bm.runs() for s in range(s, s + n, bm.granularity)}


COMBOS = [
    ("incremental", "on-success"),
    ("bitmap", "on-success"),
    ("bitmap", "always"),
    ("bitmap", "never"),
    ("full", "on-success"),
    ("full", "always"),
    ("top", "on-success"),
    ("top", "always"),
]


@pytest.mark.parametrize(("sync", "mode"), COMBOS)
@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.parametrize("gran", [K64, 4096])
async def test_sync_and_bitmap_modes(env: Env, sync: str, mode: str, fail: bool, gran: int) -> None:
    # The previous full backup is already on the target.
    fd = os.open(env.tgt_path, os.O_WRONLY)
    os.pwrite(fd, env.t0, 0)
    os.close(fd)
    bitmaps_of(env.src).create("b0", gran)
    for o in D_OFFSETS:
        await env.src.write(o, b"\xd1" * 1000)
    at_t0: list[bytes] = []

    async def snapshot() -> None:
        at_t0.append(read_file(env.src_path))

    if fail:
        env.tgt_debug.add_rule(IOType.WRITE, errno.EIO, offset=FAIL_AT, length=4096)
    job = await env.bb.backup(
        "src",
        "tgt",
        sync=sync,
        bitmap="b0",
        speed=64 * 1024,
        bitmap_mode=None if sync == "incremental" else mode,
        perf=None,
        at_point_in_time=snapshot,
    )
    assert bitmaps_of(env.src).get("b0").busy  # type: ignore[union-attr]
    if sync in ("incremental", "bitmap"):
        assert job.progress_total == len({o // K64 for o in D_OFFSETS}) * K64
    for o in S_OFFSETS:
        await env.src.write(o, b"\x52" * 100)
    job.set_speed(0)
    if fail:
        with pytest.raises(BackupFailed, match="Input/output error"):
            await env.bb.wait(job)
    else:
        await env.bb.wait(job)
    d, s = clusters(D_OFFSETS, gran), clusters(S_OFFSETS, gran)
    got = granules_of(env, "b0")
    assert not bitmaps_of(env.src).get("b0").busy  # type: ignore[union-attr]
    assert s <= got  # writes during the job are never lost
    if mode == "never" or (fail and mode == "on-success"):
        assert got == d | s
    elif not fail:
        assert got == s
    else:  # always, failed: the job's writes plus what was not copied, incl. the failure
        assert FAIL_AT // gran in got
        if sync in ("incremental", "bitmap"):
            assert got <= d | s | {
                c * (K64 // gran) + i
                for c in range(64)
                for i in range(K64 // gran)
                if c in {x // K64 for x in D_OFFSETS}
            }
    if not fail:
        assert read_file(env.tgt_path) == at_t0[0]


async def test_incremental_then_again(env: Env) -> None:
    """A second incremental only copies what changed since the first one."""
    fd = os.open(env.tgt_path, os.O_WRONLY)
    os.pwrite(fd, env.t0, 0)
    os.close(fd)
    bm = bitmaps_of(env.src).create("b0")
    await env.src.write(3 * K64, b"a" * 10)
    job = await env.bb.backup("src", "tgt", sync="incremental", bitmap="b0")
    await env.bb.wait(job)
    assert job.progress_total == K64
    assert bitmaps_of(env.src).get("b0").count == 0
    await env.src.write(9 * K64, b"b" * 10)
    assert bm is not bitmaps_of(env.src).get("b0")  # the successor carries the name now
    job = await env.bb.backup("src", "tgt", sync="incremental", bitmap="b0")
    await env.bb.wait(job)
    assert job.progress_total == K64
    assert read_file(env.tgt_path) == read_file(env.src_path)


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
        ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
        (
            {"sync": "full", "bitmap": "nobm", "bitmap_mode": "always"},
            "Bitmap 'nobm' could not be found",
        ),
        (
            {"sync": "full", "bitmap_mode": "always"},
            "Cannot specify bitmap sync mode without a bitmap",
        ),
        (
            {"sync": "incremental", "bitmap": "b0", "bitmap_mode": "always"},
            "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
        ),
        (
            {"sync": "bitmap", "bitmap": "b0"},
            "Bitmap sync mode must be given when providing a bitmap",
        ),
        (
            {"sync": "none", "bitmap": "b0", "bitmap_mode": "on-success"},
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ),
        (
            {"sync": "full", "bitmap": "b0", "bitmap_mode": "never"},
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'",
        ),
        (
            {"sync": "top", "bitmap": "b0", "bitmap_mode": "never"},
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'top'",
        ),
    ],
)
async def test_argument_errors(env: Env, kw: dict[str, str], text: str) -> None:
    bitmaps_of(env.src).create("b0")
    sync = kw.pop("sync")
    with pytest.raises(BlockBackupError) as info:
        await env.bb.backup("src", "tgt", sync=sync, **kw)
    assert str(info.value) == text
    assert not env.src._before_write
    assert not bitmaps_of(env.src).get("b0").busy


async def test_busy_bitmap_refused(env: Env) -> None:
    bitmaps_of(env.src).create("b0")
    await env.src.write(0, b"x")
    job = await env.bb.backup("src", "tgt", sync="incremental", bitmap="b0", speed=1)
    with pytest.raises(BlockBackupError) as info:
        await env.bb.backup("src", "tgt", sync="bitmap", bitmap="b0", bitmap_mode="never")
    assert str(info.value) == (
        "Bitmap 'b0' is currently in use by another operation and cannot be used"
    )
    await job.cancel()
    with pytest.raises(BackupFailed):
        await env.bb.wait(job)
    assert bitmaps_of(env.src).get("b0").count == K64  # type: ignore[union-attr]
    await asyncio.sleep(0)


@pytest.mark.parametrize("fail", [False, True])
async def test_scattered_clusters_go_in_batches(tmp_path: Path, fail: bool) -> None:
    """Isolated dirty clusters are copied several to a chunk (one read, one write call);
    guest writes to them while the batches are in flight still leave their T0 content on
    the target, and a failure inside a batch leaves every cluster of it dirty."""
    size = 8 * MiB
    data = os.urandom(size)
    src_path = make_image(tmp_path / "src.img", size, [(0, data)])
    tgt_path = make_image(tmp_path / "tgt.img", size, [(0, data)])  # the previous full backup
    dirty = [c * K64 for c in range(1, 128, 3)]  # 43 isolated clusters
    async with BlockBackup() as bb:
        # A plain file source (read in one call per batch); a target that is not a plain
        # file (so chunks are not file-to-file copies, which are one call each already).
        src = await bb.blockdev_add(raw_node("src", src_path))
        tgt = await bb.blockdev_add(
            {"driver": "blkdebug", "node-name": "tgt", "image": raw_node("tgt-raw", tgt_path)}
        )
        assert src.fd_map(0) is not None
        assert tgt.fd_map(0) is None
        bitmaps_of(src).create("b0", K64)
        for o in dirty:
            await src.write(o + 1000, b"\xd1" * 3000)
        if fail:
            assert isinstance(tgt.driver, BlkdebugDriver)
            tgt.driver.add_rule(IOType.WRITE, errno.EIO, offset=dirty[21], length=4096)
        batches: list[int] = []
        write_many = tgt.write_many

        async def counted(
            pieces: list[tuple[int, bytes]], flags: WriteFlags = WriteFlags.NONE
        ) -> None:
            batches.append(len(pieces))
            await write_many(pieces, flags)

        tgt.write_many = counted  # type: ignore[method-assign]
        at_t0: list[bytes] = []

        async def snapshot() -> None:
            at_t0.append(read_file(src_path))

        job = await bb.backup(
            "src",
            "tgt",
            sync="incremental",
            bitmap="b0",
            perf=BackupPerf(max_workers=2),
            at_point_in_time=snapshot,
        )
        # Guest writes to dirty clusters, some claimed by batches in flight by now.
        guests = [src.write(o, b"\x52" * 4096) for o in dirty[::4]]
        await asyncio.gather(*guests)
        if fail:
            with pytest.raises(BackupFailed, match="Input/output error"):
                await bb.wait(job)
        else:
            await bb.wait(job)
        assert max(batches) > 1  # batched
        bitmap = bitmaps_of(src).get("b0")
        assert bitmap is not None
        got = {o for start, n in bitmap.runs() for o in range(start, start + n, K64)}
        written = set(dirty[::4])
        if fail:
            assert got == set(dirty)  # on-success, failed: all of it again, and the guests'
        else:
            assert got == written  # only what guests wrote meanwhile
            assert read_file(tgt_path) == at_t0[0]
