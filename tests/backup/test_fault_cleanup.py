"""After any fault the daemon returns to a clean state (issue 12, fault 5).

A backup that fails (ENOSPC on a real full tmpfs, EIO from blkdebug), is cancelled, or is
cut off by an NBD client that vanishes mid-write must leave nothing behind: the target node
can be deleted, the target file's space comes back once it is unlinked (no fd held), and
the daemon stops without a traceback. Driven through QMP against ``blockbackup daemon`` as
a subprocess, as a user runs it. The library's ``wait()`` raises on a job paused by its
error policy instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from blockbackup.api import BackupFailed, BlockBackup, JobPausedOnError
from blockbackup.jobs.status import JobStatus
from testkit.daemon_proc import DaemonProcess, daemon_process
from testkit.tmpfs import free_bytes, mounted_tmpfs

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]
MiB = 1 << 20
#: Larger than the 64 MiB tmpfs, and all data (random), so the copy must run out of space.
SRC_SIZE = 96 * MiB


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    with mounted_tmpfs(tmp_path / "full", "64m") as path:
        yield path


def _source(tmp_path: Path) -> Path:
    path = tmp_path / "src.img"
    with open(path, "wb") as f:
        for _ in range(SRC_SIZE // (8 * MiB)):
            f.write(os.urandom(8 * MiB))
    return path


def _target_file(directory: Path) -> Path:
    path = directory / "tgt.img"
    with open(path, "wb") as f:
        f.truncate(SRC_SIZE)
    return path


def _raw(name: str, path: Path) -> dict[str, Any]:
    return {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}}


@pytest_asyncio.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    src = _source(tmp_path)
    sock = tmp_path / "nbd.sock"
    args = [
        "--blockdev",
        f'{{"driver": "raw", "node-name": "src", "file": '
        f'{{"driver": "file", "filename": "{src}"}}}}',
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
    ]
    async with daemon_process(tmp_path, args) as d:
        yield d
    # The daemon stopped cleanly: no traceback, exit code 0.
    assert "Traceback" not in d.stderr, d.stderr
    assert "Error" not in d.stderr.replace("BLOCK_JOB_ERROR", ""), d.stderr
    assert d.exit_code == 0, d.stderr


async def _assert_clean(d: DaemonProcess, target: Path, empty_free: int) -> None:
    """The target node goes, its file's space with it (no buffer, fd or parent left)."""
    await d.cmd("blockdev-del", {"node-name": "tgt"})
    nodes = await d.cmd("query-named-block-nodes", {"flat": True})
    names = sorted(n["node-name"] for n in nodes)
    assert len(names) == 2  # src and its file child: the target and its child are gone
    assert names[1] == "src"
    os.unlink(target)
    assert free_bytes(target.parent) == empty_free
    assert await d.cmd("query-block-jobs") == []


async def _add_target(d: DaemonProcess, directory: Path, **extra: Any) -> tuple[Path, int]:
    empty_free = free_bytes(directory)
    target = _target_file(directory)
    opts = _raw("tgt", target)
    if extra:
        opts = {
            "driver": "blkdebug",
            "node-name": "tgt",
            "image": {**opts, "node-name": "tgt-raw"},
            **extra,
        }
    await d.cmd("blockdev-add", opts)
    return target, empty_free


async def test_enospc_report_leaves_nothing_behind(tmpfs: Path, daemon: DaemonProcess) -> None:
    target, empty_free = await _add_target(daemon, tmpfs)
    await daemon.cmd(
        "blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
    )
    done = await daemon.event("BLOCK_JOB_COMPLETED", device="j")
    assert done["data"]["error"] == "No space left on device"
    await _assert_clean(daemon, target, empty_free)


async def test_enospc_stop_pauses_then_cancel_leaves_nothing(
    tmpfs: Path, daemon: DaemonProcess
) -> None:
    target, empty_free = await _add_target(daemon, tmpfs)
    await daemon.cmd(
        "blockdev-backup",
        {
            "job-id": "j",
            "device": "src",
            "target": "tgt",
            "sync": "full",
            "on-target-error": "stop",
        },
    )
    err = await daemon.event("BLOCK_JOB_ERROR", device="j")
    assert err["data"] == {"device": "j", "operation": "write", "action": "stop"}
    await daemon.event("JOB_STATUS_CHANGE", id="j", status="paused")
    (job,) = await daemon.cmd("query-block-jobs")
    assert (job["status"], job["io-status"]) == ("paused", "nospace")
    await daemon.cmd("job-cancel", {"id": "j"})
    await daemon.event("BLOCK_JOB_CANCELLED", device="j")
    await _assert_clean(daemon, target, empty_free)


async def test_quit_while_paused_on_enospc_is_clean(tmpfs: Path, daemon: DaemonProcess) -> None:
    """Shutting down with a job paused on a full disk: no traceback, exit 0, and every fd on
    the tmpfs closed (the fixture unmounts it after the daemon is gone)."""
    await _add_target(daemon, tmpfs)
    await daemon.cmd(
        "blockdev-backup",
        {"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
         "on-target-error": "enospc"},
    )  # fmt: skip
    await daemon.event("BLOCK_JOB_ERROR", device="j")
    await daemon.event("JOB_STATUS_CHANGE", id="j", status="paused")


async def test_eio_from_blkdebug_leaves_nothing(tmpfs: Path, daemon: DaemonProcess) -> None:
    rule = {"event": "write_aio", "errno": 5, "once": False}
    target, empty_free = await _add_target(daemon, tmpfs, **{"inject-error": [rule]})
    await daemon.cmd(
        "blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
    )
    done = await daemon.event("BLOCK_JOB_COMPLETED", device="j")
    assert done["data"]["error"] == "Input/output error"
    await _assert_clean(daemon, target, empty_free)


async def test_cancel_leaves_nothing(tmpfs: Path, daemon: DaemonProcess) -> None:
    target, empty_free = await _add_target(daemon, tmpfs)
    await daemon.cmd(
        "blockdev-backup",
        {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 4 * MiB},
    )
    await daemon.event("JOB_STATUS_CHANGE", id="j", status="running")
    await daemon.cmd("job-cancel", {"id": "j"})
    await daemon.event("BLOCK_JOB_CANCELLED", device="j")
    await _assert_clean(daemon, target, empty_free)


_REQ = struct.Struct(">IHHQQI")
_REQUEST_MAGIC = 0x25609513
_IHAVEOPT = 0x49484156454F5054
_OPT_GO = 7


async def _nbd_client(sock: Path, name: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw NBD client in transmission on export ``name`` (simple replies)."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3))
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    writer.write(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
    while True:
        _, _, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if rtype == 1:
            return reader, writer


async def test_nbd_client_vanishing_mid_write_leaves_nothing(
    tmpfs: Path, daemon: DaemonProcess, tmp_path: Path
) -> None:
    """Guest writes through an export, each copying before it writes to a target that is
    full; the client goes away with writes in flight and one cut in half."""
    target, empty_free = await _add_target(daemon, tmpfs)
    # The export first: once the backup's filter sits on the source, it shares no write on
    # it with a new user (as in QEMU), and the export moves onto the filter instead.
    await daemon.cmd(
        "block-export-add",
        {"type": "nbd", "id": "e", "node-name": "src", "name": "src", "writable": True},
    )
    await daemon.cmd(
        "blockdev-backup",
        {
            "job-id": "j",
            "device": "src",
            "target": "tgt",
            "sync": "full",
            "speed": 1,
            "on-target-error": "stop",
        },
    )
    _reader, writer = await _nbd_client(tmp_path / "nbd.sock", b"src")
    chunk = 4 * MiB
    for i in range(SRC_SIZE // chunk):  # more than the tmpfs holds: copies hit ENOSPC
        writer.write(_REQ.pack(_REQUEST_MAGIC, 0, 1, i, i * chunk, chunk) + b"\x5a" * chunk)
    writer.write(_REQ.pack(_REQUEST_MAGIC, 0, 1, 99, 0, chunk) + b"\x5a" * (chunk // 2))
    await writer.drain()
    writer.transport.abort()
    async with asyncio.timeout(60):
        while True:  # the server notices the client is gone and ends its requests
            try:
                await daemon.cmd("block-export-del", {"id": "e"})
                break
            except Exception:  # "still in use" until the client is gone
                await asyncio.sleep(0.05)
    await daemon.event("BLOCK_EXPORT_DELETED", id="e")
    await daemon.cmd("job-cancel", {"id": "j"})
    await daemon.event("BLOCK_JOB_CANCELLED", device="j")
    await _assert_clean(daemon, target, empty_free)


async def test_library_wait_raises_on_a_job_paused_by_enospc(tmp_path: Path, tmpfs: Path) -> None:
    src = _source(tmp_path)
    empty_free = free_bytes(tmpfs)
    target = _target_file(tmpfs)
    async with BlockBackup() as bb:
        await bb.blockdev_add(_raw("src", src))
        await bb.blockdev_add(_raw("tgt", target))
        events = bb.events.subscribe()
        job = await bb.backup("src", "tgt", sync="full", on_target_error="stop")
        async with asyncio.timeout(60):
            with pytest.raises(JobPausedOnError) as info:
                await bb.wait(job)
        paused = info.value
        assert paused.job is job
        assert job.paused_on_error
        assert (paused.io_status, paused.operation) == ("nospace", "write")
        assert paused.error is not None
        assert paused.error.strerror == "No space left on device"
        assert job.status is JobStatus.PAUSED
        errors = [ev for ev in events.drain() if ev["event"] == "BLOCK_JOB_ERROR"]
        assert [ev["data"]["action"] for ev in errors][-1:] == ["stop"]
        # Still paused on the error: a second wait() says so again at once.
        with pytest.raises(JobPausedOnError):
            await bb.wait(job)
        await job.cancel()
        with pytest.raises(BackupFailed):
            await bb.wait(job)
        await bb.graph.delete("tgt")
        target.unlink()
        assert free_bytes(tmpfs) == empty_free


async def test_library_resume_after_freeing_space_completes(tmp_path: Path, tmpfs: Path) -> None:
    """The point of ``stop``: the caller frees space, resumes, and the backup completes."""
    size = 40 * MiB
    src = tmp_path / "small.img"
    src.write_bytes(os.urandom(size))
    filler = tmpfs / "filler"
    filler.write_bytes(bytes(40 * MiB))  # leaves less room than the backup needs
    target = tmpfs / "tgt.img"
    with open(target, "wb") as f:
        f.truncate(size)
    async with BlockBackup() as bb:
        await bb.blockdev_add(_raw("src", src))
        await bb.blockdev_add(_raw("tgt", target))
        job = await bb.backup("src", "tgt", sync="full", on_target_error="enospc")
        async with asyncio.timeout(60):
            with pytest.raises(JobPausedOnError) as info:
                await bb.wait(job)
            assert info.value.io_status == "nospace"
            filler.unlink()
            job.resume()
            assert not job.paused_on_error
            await bb.wait(job)
        assert job.error is None
    assert target.read_bytes() == src.read_bytes()
