"""The backup job through the library API: events, verbs, error policies, sync modes.

Every test that lets a backup finish checks the target against the source's content at T0.
Failures are injected with blkdebug rules, never by patching code.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockbackup.api import BackupFailed, BlockBackup
from blockbackup.block import block_copy
from blockbackup.block.drivers.blkdebug import BlkdebugDriver, IOType
from blockbackup.block.graph import CloseError
from blockbackup.errors import BlockBackupError
from blockbackup.jobs.backup import BackupJob, BackupPerf
from blockbackup.jobs.status import IoStatus, JobStatus
from testkit.backup_env import SIZE, Env
from testkit.images import cached_bytes, make_image, page_cache_drops, raw_node, read_file

pytestmark = pytest.mark.asyncio
MiB = 1 << 20


async def wait_status(job: BackupJob, status: JobStatus) -> None:
    while job.status is not status:
        await asyncio.sleep(0.001)


def assert_clean(env: Env, job: BackupJob) -> None:
    """After the job: nothing in flight, interception gone, filter node gone."""
    assert not job.block_copy.reqs
    assert not env.src._before_write
    assert not any(n.driver.driver_name == "copy-before-write" for n in env.bb.graph.nodes.values())
    assert env.src.users == {}
    assert env.tgt.users == {}


async def test_success_events_and_content(env: Env) -> None:
    with env.bb.events.subscribe() as sub:
        job = await env.bb.backup("src", "tgt", job_id="job0")
        await env.bb.wait(job)
        events = sub.drain()
    assert env.event_names(events) == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    completed = next(e for e in events if e["event"] == "BLOCK_JOB_COMPLETED")
    assert completed["data"] == {
        "type": "backup",
        "device": "job0",
        "len": SIZE,
        "offset": SIZE,
        "speed": 0,
    }
    assert read_file(env.tgt_path) == env.t0
    assert_clean(env, job)


async def test_guest_writes_during_backup_are_not_in_it(env: Env) -> None:
    job = await env.bb.backup("src", "tgt", speed=1 * MiB)  # slow: writes land mid-job
    new = os.urandom(SIZE)
    for offset in range(0, SIZE, 256 * 1024):
        await env.src.write(offset, new[offset : offset + 4096])
    assert job.progress_current < job.progress_total or job.status is not JobStatus.RUNNING
    job.set_speed(0)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0
    source = read_file(env.src_path)
    assert source[:4096] == new[:4096]  # the guest writes went through


async def test_guest_writes_are_never_rate_limited(env: Env) -> None:
    """At 1 byte/s the background barely moves, yet every guest write completes at once."""
    job = await env.bb.backup("src", "tgt", speed=1)
    for offset in range(0, SIZE, 64 * 1024):
        await env.src.write(offset, b"\x01" * 512)
    assert job.status is JobStatus.RUNNING
    # Every cluster was copied by copy-before-write, and progress counts those copies.
    assert job.progress_current == SIZE
    job.set_speed(0)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0


async def test_guest_write_cancelled_during_its_copy_leaves_the_cluster_to_copy(env: Env) -> None:
    """A guest write runs its copy-before-write itself; cancelled mid-copy, it loses nothing.

    The cluster is dirty again (the bitmap stays exact), the source is unchanged there, and
    the backup still ends with the T0 content.
    """
    job = await env.bb.backup("src", "tgt", speed=1)  # the background barely moves
    cluster = job.block_copy.cluster_size
    offset = SIZE - cluster  # the background starts at 0
    held = env.tgt_debug.add_breakpoint("write", offset=offset, length=cluster)
    guest = asyncio.ensure_future(env.src.write(offset, b"\x02" * 4096))
    await held.arrived.wait()  # the guest's copy is writing the target
    assert job.block_copy.guest_copies_active == 1
    guest.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guest
    assert job.block_copy.guest_copies_active == 0
    assert job.block_copy.reqs.find_conflict(offset, cluster) is None  # the claim is gone...
    assert job.block_copy.copy_bitmap.next_dirty_area(offset, SIZE, SIZE) == (offset, cluster)
    assert read_file(env.src_path)[offset:] == env.t0[offset:]  # ...and the guest wrote nothing
    env.tgt_debug.remove_breakpoint(held)
    job.set_speed(0)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0
    assert_clean(env, job)


async def test_write_now_during_a_backup_copies_cached_clusters_first(env: Env) -> None:
    """The NBD server's inline write path works during a backup.

    A write to a cluster still to copy copies it first, at once, when the source data is
    cached and the target can be written at once; the backup still holds T0.
    """
    job = await env.bb.backup("src-raw", "tgt-raw", speed=1)  # the background barely moves
    top = job.filter_node
    cluster = job.block_copy.cluster_size
    late = SIZE - cluster  # not copied yet: the background starts at 0
    assert job.block_copy.needs_copy(late, 4096)
    assert top.write_now(late, b"\x03" * 4096)  # copied first, then written
    assert not job.block_copy.needs_copy(late, 4096)
    assert read_file(env.tgt_path)[late:] == env.t0[late:]  # T0 is on the target already
    assert top.write_now(late + 8192, b"\x04" * 4096)  # copied: written at once
    source = read_file(env.src_path)
    assert source[late : late + 4096] == b"\x03" * 4096
    assert source[late + 8192 : late + 12288] == b"\x04" * 4096
    job.set_speed(0)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0


async def test_write_now_during_a_backup_waits_where_the_copy_cannot_go_at_once(
    env: Env,
) -> None:
    """A target that cannot be written at once (here blkdebug), or a cluster whose copy is
    in flight, sends the write to the awaiting path with nothing written and the cluster
    still to copy."""
    job = await env.bb.backup("src", "tgt", speed=1)
    top = job.filter_node
    cluster = job.block_copy.cluster_size
    late = SIZE - cluster
    assert not top.write_now(late, b"\x03" * 4096)
    assert job.block_copy.copy_bitmap.next_dirty_area(late, SIZE, SIZE) == (late, cluster)
    assert read_file(env.src_path)[late:] == env.t0[late:]

    held = env.tgt_debug.add_breakpoint("write", offset=late, length=cluster)
    guest = asyncio.ensure_future(top.write(late, b"\x03" * 4096))
    await held.arrived.wait()  # the guest's copy is writing the target
    assert not top.write_now(late + 8192, b"\x04" * 4096)  # in flight: must wait
    env.tgt_debug.remove_breakpoint(held)
    await guest
    assert not job.block_copy.needs_copy(late, cluster)
    await top.write(late + 8192, b"\x04" * 4096)
    job.set_speed(0)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0
    assert read_file(env.src_path)[late + 8192 : late + 12288] == b"\x04" * 4096


async def test_cancel_while_running(env: Env) -> None:
    with env.bb.events.subscribe() as sub:
        job = await env.bb.backup("src", "tgt", job_id="j", speed=512 * 1024)
        await env.src.write(0, b"x" * 4096)
        await job.cancel()
        with pytest.raises(BackupFailed, match="Operation canceled"):
            await env.bb.wait(job)
        events = sub.drain()
    assert env.event_names(events) == [
        "created", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null",
    ]  # fmt: skip
    cancelled = next(e for e in events if e["event"] == "BLOCK_JOB_CANCELLED")
    assert cancelled["data"]["offset"] == job.progress_current < SIZE  # type: ignore[index]
    assert read_file(env.src_path)[:4096] == b"x" * 4096  # the source is intact
    assert read_file(env.src_path)[4096:] == env.t0[4096:]
    assert_clean(env, job)


async def test_pause_resume(env: Env) -> None:
    job = await env.bb.backup("src", "tgt", speed=1 * MiB)
    job.pause()
    await wait_status(job, JobStatus.PAUSED)
    progress = job.progress_current
    assert not job.block_copy.reqs  # a paused job has no copy in flight
    with pytest.raises(BlockBackupError, match="Job is already paused"):
        job.pause()
    await env.src.write(SIZE - 4096, b"y" * 4096)  # copy-before-write works while paused
    assert job.progress_current > progress
    job.resume()
    with pytest.raises(BlockBackupError, match="Can't resume a job that was not paused"):
        job.resume()
    job.set_speed(0)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0


async def test_set_speed_negative(env: Env) -> None:
    job = await env.bb.backup("src", "tgt", speed=1 * MiB)
    with pytest.raises(BlockBackupError, match="Parameter 'speed' expects a non-negative value"):
        job.set_speed(-5)
    job.set_speed(0)
    await env.bb.wait(job)


async def test_negative_speed_at_start_sends_created_then_null(env: Env) -> None:
    with env.bb.events.subscribe() as sub:
        with pytest.raises(
            BlockBackupError, match="Parameter 'speed' expects a non-negative value"
        ):
            await env.bb.backup("src", "tgt", job_id="neg", speed=-1)
        assert env.event_names(sub.drain()) == ["created", "null"]
    assert not env.src._before_write


# -- error policies -----------------------------------------------------------------------


@pytest.mark.parametrize("side", ["source", "target"])
async def test_report_fails_the_job(env: Env, side: str) -> None:
    debug, op = (env.src_debug, IOType.READ) if side == "source" else (env.tgt_debug, IOType.WRITE)
    debug.add_rule(op, errno.EIO, offset=MiB, length=4096)
    with env.bb.events.subscribe() as sub:
        job = await env.bb.backup("src", "tgt", job_id="j")
        with pytest.raises(BackupFailed, match="Input/output error"):
            await env.bb.wait(job)
        events = sub.drain()
    names = env.event_names(events)
    assert names[names.index("BLOCK_JOB_ERROR") :] == [
        "BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    error = next(e for e in events if e["event"] == "BLOCK_JOB_ERROR")
    assert error["data"] == {
        "device": "j",
        "operation": "read" if side == "source" else "write",
        "action": "report",
    }
    assert job.error == "Input/output error"
    # report: the failed chunk is not retried, even if it became dirty again before the
    # copy loop saw the failure
    assert job.progress_current <= SIZE - MiB
    assert read_file(env.src_path) == env.t0
    assert_clean(env, job)


@pytest.mark.parametrize(("policy", "code", "io_status"), [
    ("stop", errno.EIO, IoStatus.FAILED),
    ("enospc", errno.ENOSPC, IoStatus.NOSPACE),
    ("auto", errno.ENOSPC, IoStatus.NOSPACE),
])  # fmt: skip
@pytest.mark.parametrize("once", [True, False])
@pytest.mark.parametrize("side", ["source", "target"])
async def test_stop_pauses_then_resume_retries(
    env: Env, policy: str, code: int, io_status: IoStatus, once: bool, side: str
) -> None:
    debug, op = (env.src_debug, IOType.READ) if side == "source" else (env.tgt_debug, IOType.WRITE)
    rule = debug.add_rule(op, code, offset=2 * MiB, length=4096, once=once)
    policies = {"on_source_error": policy} if side == "source" else {"on_target_error": policy}
    job = await env.bb.backup("src", "tgt", **policies)
    await wait_status(job, JobStatus.PAUSED)
    assert job.io_status is io_status
    assert job.query_block_jobs_info()["io-status"] == io_status.value
    if not once:
        hits = rule.hits
        job.resume()  # the rule still fires: the job stops again
        while rule.hits == hits or job.status is not JobStatus.PAUSED:
            await asyncio.sleep(0.001)
        debug.remove_rule(rule)
    job.resume()
    await env.bb.wait(job)
    assert job.io_status is IoStatus.OK
    assert read_file(env.tgt_path) == env.t0


@pytest.mark.parametrize("policy", ["enospc", "auto"])
async def test_enospc_policies_report_other_errors(env: Env, policy: str) -> None:
    env.src_debug.add_rule(IOType.READ, errno.EIO, offset=MiB, length=4096)
    job = await env.bb.backup("src", "tgt", on_source_error=policy)
    with pytest.raises(BackupFailed, match="Input/output error"):
        await env.bb.wait(job)


@pytest.mark.parametrize("side", ["source", "target"])
async def test_ignore_retries(env: Env, side: str) -> None:
    debug, op = (env.src_debug, IOType.READ) if side == "source" else (env.tgt_debug, IOType.WRITE)
    rule = debug.add_rule(op, errno.EIO, offset=3 * MiB, length=4096, once=True)
    with env.bb.events.subscribe() as sub:
        job = await env.bb.backup("src", "tgt", on_source_error="ignore", on_target_error="ignore")
        await env.bb.wait(job)
        errors = [e for e in sub.drain() if e["event"] == "BLOCK_JOB_ERROR"]
    assert rule.hits == 1
    assert [e["data"]["action"] for e in errors] == ["ignore"]  # type: ignore[index]
    assert read_file(env.tgt_path) == env.t0


async def test_ignore_with_a_persistent_error_keeps_retrying(env: Env) -> None:
    rule = env.tgt_debug.add_rule(IOType.WRITE, errno.EIO, offset=MiB, length=4096)
    job = await env.bb.backup("src", "tgt", on_target_error="ignore")
    while rule.hits < 5:
        await asyncio.sleep(0.001)
    assert job.status is JobStatus.RUNNING
    env.tgt_debug.remove_rule(rule)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0


async def test_flush_failure_fails_the_job(env: Env) -> None:
    """Success is reported only after the target is flushed."""
    env.tgt_debug.add_rule(IOType.FLUSH, errno.EIO)
    job = await env.bb.backup("src", "tgt")
    with pytest.raises(BackupFailed, match="Input/output error"):
        await env.bb.wait(job)
    with pytest.raises(CloseError, match=r"^Failed to flush 'tgt' "):
        await env.bb.aclose()  # the rule still fires at close: reported, not swallowed


# -- copy-before-write failures -------------------------------------------------------------


async def test_break_guest_write(env: Env) -> None:
    """A failed copy fails the guest write; the source keeps its old data."""
    rule = env.tgt_debug.add_rule(IOType.WRITE, errno.EIO, offset=MiB, length=4096)
    job = await env.bb.backup("src", "tgt", speed=1, on_target_error="stop")
    with pytest.raises(OSError, match="Input/output error") as info:
        await env.src.write(MiB, b"z" * 4096)
    assert info.value.errno == errno.EIO
    assert read_file(env.src_path)[MiB : MiB + 4096] == env.t0[MiB : MiB + 4096]
    env.tgt_debug.remove_rule(rule)
    await env.src.write(MiB, b"z" * 4096)  # the copy works now, so does the write
    job.set_speed(0)
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0


async def test_break_snapshot(env: Env) -> None:
    """A failed copy lets the guest write through and fails the backup instead."""
    env.tgt_debug.add_rule(IOType.WRITE, errno.EIO, offset=MiB, length=4096)
    job = await env.bb.backup("src", "tgt", speed=1, on_cbw_error="break-snapshot")
    await env.src.write(MiB, b"z" * 4096)
    assert read_file(env.src_path)[MiB : MiB + 4096] == b"z" * 4096
    with pytest.raises(BackupFailed, match="Input/output error"):
        await env.bb.wait(job)
    await env.src.write(MiB, b"w" * 4096)  # the source is free again
    assert_clean(env, job)


# -- sync modes -------------------------------------------------------------------------------


async def test_sync_none_copies_only_what_is_written(env: Env) -> None:
    with env.bb.events.subscribe() as sub:
        job = await env.bb.backup("src", "tgt", sync="none", job_id="fleece")
        await env.src.write(100, b"n" * 10)  # one 64 KiB cluster
        await env.src.write(3 * MiB + 70000, b"m" * 70000)  # two clusters
        assert job.progress_current == 3 * 65536
        assert job.progress_total == SIZE
        tgt = read_file(env.tgt_path)
        assert tgt[:65536] == env.t0[:65536]
        assert (
            tgt[3 * MiB + 65536 : 3 * MiB + 3 * 65536]
            == env.t0[3 * MiB + 65536 : 3 * MiB + 3 * 65536]
        )
        assert tgt[65536 : 2 * 65536] == bytes(65536)  # untouched clusters are not copied
        await job.cancel()
        with pytest.raises(BackupFailed):
            await env.bb.wait(job)
        cancelled = next(e for e in sub.drain() if e["event"] == "BLOCK_JOB_CANCELLED")
    assert cancelled["data"]["offset"] == 3 * 65536  # type: ignore[index]


async def test_sync_top_on_raw_is_full(env: Env) -> None:
    job = await env.bb.backup("src", "tgt", sync="top")
    await env.bb.wait(job)
    assert job.progress_total == SIZE
    assert read_file(env.tgt_path) == env.t0


async def test_copy_range_path(env: Env) -> None:
    """The copy_file_range path is used between plain files (blkdebug forbids it, so use raw)."""
    await env.bb.blockdev_add({"driver": "raw", "node-name": "plain-src", "file": "src-raw"})
    job = await env.bb.backup("src-raw", "tgt-raw", perf=BackupPerf(use_copy_range=True))
    await env.bb.wait(job)
    assert job.block_copy.use_copy_range  # still on: no fallback was needed
    assert read_file(env.tgt_path) == env.t0


async def test_local_files_copy_through_reused_buffers(env: Env) -> None:
    """Between plain files, read + write is one call through pooled buffers; zeroes stay holes."""
    with open(env.src_path, "r+b") as f:
        f.seek(MiB)
        f.write(bytes(MiB))  # zero data (allocated): read, found zero, not written
    t0 = read_file(env.src_path)
    job = await env.bb.backup("src-raw", "tgt-raw")
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == t0
    assert job.block_copy._between_files  # the path was taken, no fallback
    fd = os.open(env.tgt_path, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 2 * MiB  # the zero MiB is a hole
    finally:
        os.close(fd)


async def _poll(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (a page-cache state, which no event announces), bounded."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_background_copy_drops_the_target_cache_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``DROP_BEHIND`` bytes, the target's written-back pages leave the page cache,
    and a finished backup leaves nothing of its target cached: a backup does not fill the
    host's memory with a disk nobody reads back. A ``no-flush`` target keeps its pages
    (dropping means writing back, which it was told to spare).

    The kernel evicts only clean pages, and how far writeback lags the copy depends on
    the host's load, so the drop-behind is checked where the test decides what is clean:
    the copy is held at 16 MiB, the test writes the target back, and once the copy has
    gone on by more than ``DROP_BEHIND`` (held again at 24 MiB), those 16 MiB are gone.
    """
    if not page_cache_drops(tmp_path):
        pytest.skip("this file system never evicts its pages (tmpfs)")
    monkeypatch.setattr(block_copy.tunables, "DROP_BEHIND", 2 * MiB)
    size = 32 * MiB
    data = os.urandom(size)
    src = make_image(tmp_path / "src.img", size, [(0, data)])
    tgt = make_image(tmp_path / "tgt.img", size)
    kept = make_image(tmp_path / "kept.img", size)
    async with BlockBackup() as bb:
        await bb.blockdev_add(raw_node("src", src))
        await bb.blockdev_add(
            {"driver": "blkdebug", "node-name": "tgt", "image": raw_node("tgt-raw", tgt)}
        )
        await bb.blockdev_add(raw_node("kept", kept, cache={"no-flush": True}))
        debug = bb.graph.get("tgt").driver
        assert isinstance(debug, BlkdebugDriver)
        first = debug.add_breakpoint("write", offset=16 * MiB, length=1)
        second = debug.add_breakpoint("write", offset=24 * MiB, length=1)
        # One chunk at a time, so that the copy is sequential and drops keep up with it.
        job = await bb.backup("src", "tgt", perf=BackupPerf(max_workers=1))
        copy = job.block_copy
        assert copy._early_writeback
        await asyncio.wait_for(first.arrived.wait(), 60)
        # No drop in flight: the next one starts within DROP_BEHIND of the copy going on.
        await _poll(lambda: copy._dropping is not None and copy._dropping.done(), "a drop")
        fd = os.open(tgt, os.O_RDONLY)
        try:
            os.fsync(fd)  # the first 16 MiB are clean: the next drop evicts them
        finally:
            os.close(fd)
        assert cached_bytes(tgt, 0, 16 * MiB) > 0
        debug.remove_breakpoint(first)
        await asyncio.wait_for(second.arrived.wait(), 60)
        await _poll(lambda: cached_bytes(tgt, 0, 16 * MiB) == 0, "the drop behind the copy")
        debug.remove_breakpoint(second)
        await bb.wait(job)
        assert copy.data_copied == size
        job = await bb.backup("src", "kept", perf=BackupPerf(max_workers=1))
        await bb.wait(job)
        assert job.block_copy.data_copied == size
        assert not job.block_copy._early_writeback
    assert cached_bytes(tgt) == 0, f"{cached_bytes(tgt) >> 20} MiB cached"
    assert cached_bytes(kept) == size
    assert read_file(tgt) == data
    assert read_file(kept) == data


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"target": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"target": "src"}, "Source and target cannot be the same"),
    ({"sync": "fast"}, "Parameter 'sync' does not accept value 'fast'"),
    ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
    ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
    ({"bitmap_mode": "always"}, "Cannot specify bitmap sync mode without a bitmap"),
    ({"bitmap": "nobm"}, "Bitmap 'nobm' could not be found"),
    ({"compress": True}, "Compression is not supported for this drive "),
    ({"job_id": "1abc"}, "Invalid job ID '1abc'"),
    ({"job_id": "a#b"}, "Invalid job ID 'a#b'"),
    ({"perf": BackupPerf(max_workers=0)}, "max-workers must be between 1 and 2147483647"),
    ({"perf": BackupPerf(max_chunk=-1)},
     "max-chunk must be zero (which means no limit) or positive"),
    ({"perf": BackupPerf(max_chunk=4096)},
     "Required max-chunk (4096) is less than backup cluster size (65536)"),
])  # fmt: skip
async def test_argument_errors(env: Env, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"device": "src", "target": "tgt", **kwargs}
    with pytest.raises(BlockBackupError) as info:
        await env.bb.backup(**args)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert not env.src._before_write
    assert not any(n.driver.driver_name == "copy-before-write" for n in env.bb.graph.nodes.values())


async def test_different_sizes(env: Env, tmp_path: os.PathLike[str]) -> None:
    small = os.path.join(tmp_path, "small.img")
    with open(small, "wb") as f:
        f.truncate(SIZE // 2)
    await env.bb.blockdev_add({"driver": "file", "node-name": "small", "filename": small})
    with pytest.raises(BlockBackupError, match=r"^Source and target image have different sizes$"):
        await env.bb.backup("src", "small")


async def test_target_is_busy_and_duplicate_job_id(env: Env, tmp_path: os.PathLike[str]) -> None:
    job = await env.bb.backup("src", "tgt", job_id="job0", speed=1)
    other = os.path.join(tmp_path, "other.img")
    with open(other, "wb") as f:
        f.truncate(SIZE)
    await env.bb.blockdev_add({"driver": "file", "node-name": "other", "filename": other})
    with pytest.raises(
        BlockBackupError, match=r"^Node 'tgt' is busy: block device is in use by block job: backup$"
    ):
        await env.bb.backup("other", "tgt")
    with pytest.raises(BlockBackupError, match=r"^Job ID 'job0' already in use$"):
        await env.bb.backup("src", "other", job_id="job0")
    second = await env.bb.backup("src", "other")  # a source may feed two backups at once
    await env.src.write(0, b"q" * 4096)
    job.set_speed(0)
    for j in (job, second):
        await env.bb.wait(j)
    assert read_file(env.tgt_path) == env.t0
    with open(other, "rb") as f:
        assert f.read() == env.t0


async def test_source_in_use_while_backing_up(env: Env) -> None:
    job = await env.bb.backup("src", "tgt", speed=1)
    with pytest.raises(BlockBackupError, match=r"^Block device src is in use$"):
        await env.bb.graph.delete("src")
    await job.cancel()
    with pytest.raises(BackupFailed):
        await env.bb.wait(job)
    await env.bb.graph.delete("src")


async def test_no_cluster_size_warning_for_a_raw_file_target(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A file answers "no clusters" (QEMU's file-posix does): qemu-storage-daemon 7.2
    prints no block-size warning for a raw target over a file, and neither do we."""
    with caplog.at_level(logging.WARNING):
        job = await env.bb.backup("src", "tgt")
    assert "block size" not in caplog.text
    assert job.block_copy.cluster_size == 65536
    await env.bb.wait(job)


async def test_cluster_size_warning_for_a_target_without_cluster_information(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """null-co has no cluster information at all: QEMU 7.2 warns, with this text."""
    await env.bb.blockdev_add({"driver": "null-co", "node-name": "null", "size": SIZE})
    with caplog.at_level(logging.WARNING):
        job = await env.bb.backup("src", "null")
    assert "The default block size of 65536 bytes is used" in caplog.text
    assert job.block_copy.cluster_size == 65536
    await env.bb.wait(job)


async def test_min_cluster_size(env: Env) -> None:
    job = await env.bb.backup("src", "tgt", perf=BackupPerf(min_cluster_size=256 * 1024))
    assert job.block_copy.cluster_size == 256 * 1024
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0


async def test_a_cancelled_chunk_never_lends_out_a_buffer_a_thread_still_uses(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk task cancelled while its thread copies through a reused buffer does not put
    that buffer back for the next chunk: the thread keeps using it."""
    import threading

    from blockbackup.block import node

    entered, release = threading.Event(), threading.Event()
    in_use: list[object] = []
    real = node.copy_through_buffer

    def held(*args: Any, **kwargs: Any) -> list[tuple[int, int]]:
        if not in_use:
            in_use.append(args[5])  # the buffer
            entered.set()
            release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(node, "copy_through_buffer", held)  # where the node looks it up
    job = await env.bb.backup("src-raw", "tgt-raw")
    bcs = job.block_copy
    while not entered.is_set():
        await asyncio.sleep(0.001)
    chunks = list(bcs._tasks)
    for task in chunks:
        task.cancel()
    await asyncio.wait(chunks)
    assert all(buffer is not in_use[0] for buffer in bcs._buffers)
    release.set()
    await env.bb.wait(job)
    assert read_file(env.tgt_path) == env.t0  # the cancelled chunk was copied again
