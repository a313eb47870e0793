"""Differential scenarios: qemu-storage-daemon 7.2 and blockbackup must behave alike.

Each test runs one scenario against both daemons (see ``compat_kit``) and compares the
normalized transcripts and the final images.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from compat.compat_kit import (
    MiB,
    Recorder,
    assert_same,
    base_args,
    compare,
    env_ok,
    images_identical,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.asyncio,
    pytest.mark.skipif(not env_ok(), reason="qemu-storage-daemon / qemu-img not installed"),
    pytest.mark.timeout(60),
]

SLOW = 64 * 1024  # bytes/s: keeps a 4 MiB job running for the whole scenario


def backup_args(**extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"job-id": "j0", "device": "src", "target": "tgt", "sync": "full"}
    args.update(extra)
    return args


async def run(tmp: Path, scenario: Any, **kw: Any) -> tuple[Any, Any]:
    ref, ours = await compare(tmp, scenario, **kw)
    assert_same(ref, ours)
    return ref, ours


def same_targets(tmp: Path) -> None:
    assert images_identical(tmp / "qsd" / "tgt.img", tmp / "ours" / "tgt.img")


# -- backups that run to the end -------------------------------------------------------------


async def test_backup_full(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args())
        await r.wait_status("j0", "null")
        await r.cmd("query-jobs")

    await run(tmp_path, scenario)
    same_targets(tmp_path)
    assert images_identical(tmp_path / "ours" / "src.img", tmp_path / "ours" / "tgt.img")


async def test_backup_top_on_raw(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(sync="top", **{"job-id": "jtop"}))
        await r.wait_status("jtop", "null")

    await run(tmp_path, scenario)
    same_targets(tmp_path)


async def test_backup_x_perf(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        perf = {"max-workers": 1, "max-chunk": 65536, "use-copy-range": False}
        await r.cmd("blockdev-backup", backup_args(**{"x-perf": perf}))
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)
    same_targets(tmp_path)


async def test_none_then_cancel(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(sync="none"))
        await r.cmd("query-block-jobs", volatile=("busy",))
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)


# -- job control ------------------------------------------------------------------------------


async def test_cancel_while_running(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("query-jobs", volatile=("current-progress",))
        await r.cmd("block-job-cancel", {"device": "j0"})
        await r.wait_status("j0", "null")
        await r.cmd("query-jobs")

    ref, ours = await compare(tmp_path, scenario)
    # The progress at cancel time is timing: compare it masked.
    for t in (ref, ours):
        for ev in t.events:
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                ev["data"]["offset"] = "*"
    assert_same(ref, ours)


async def test_pause_resume(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        # QEMU pauses at the next pause point (after a rate-limit sleep of up to seconds):
        # status is timing; "paused": true is not.
        vol = ("current-progress", "offset", "busy", "status")
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("job-pause", {"id": "j0"})
        await r.cmd("query-jobs", volatile=vol)
        await r.cmd("query-block-jobs", volatile=vol)
        await r.cmd("job-pause", {"id": "j0"})
        await r.cmd("block-job-cancel", {"device": "j0"})
        await r.cmd("job-resume", {"id": "j0"})
        await r.cmd("job-resume", {"id": "j0"})
        await r.cmd("block-job-set-speed", {"device": "j0", "speed": 0})
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)
    same_targets(tmp_path)


async def test_set_speed(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("block-job-set-speed", {"device": "j0", "speed": -5})
        await r.cmd("block-job-set-speed", {"device": "j0", "speed": "fast"})
        await r.cmd("block-job-set-speed", {"device": "j0", "speed": 2 * SLOW})
        await r.cmd("query-block-jobs", volatile=("offset", "busy"))
        await r.cmd("block-job-set-speed", {"device": "j0", "speed": 0})
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)
    same_targets(tmp_path)


async def test_manual_finalize(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(**{"auto-finalize": False}))
        await r.wait_event("BLOCK_JOB_PENDING", id="j0")
        await r.cmd("query-jobs")
        await r.cmd("job-dismiss", {"id": "j0"})
        await r.cmd("job-pause", {"id": "j0"})
        await r.cmd("job-finalize", {"id": "j0"})
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)
    same_targets(tmp_path)


async def test_manual_dismiss(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(**{"auto-dismiss": False}))
        await r.wait_status("j0", "concluded")
        await r.cmd("query-jobs")
        await r.cmd("job-cancel", {"id": "j0"})
        await r.cmd("block-job-finalize", {"id": "j0"})
        await r.cmd("block-job-dismiss", {"id": "j0"})
        await r.cmd("query-jobs")

    await run(tmp_path, scenario)
    same_targets(tmp_path)


async def test_concluded_job_not_busy(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(**{"auto-dismiss": False}))
        await r.wait_status("j0", "concluded")
        await r.cmd("query-block-jobs")
        await r.cmd("job-dismiss", {"id": "j0"})

    await run(tmp_path, scenario)


async def test_cancel_in_pending(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(**{"auto-finalize": False}))
        await r.wait_event("BLOCK_JOB_PENDING", id="j0")
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)


async def test_job_control_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        for name in ("job-pause", "job-resume", "job-cancel", "job-complete"):
            await r.cmd(name, {"id": "nojob"})
        for name in ("job-finalize", "job-dismiss"):
            await r.cmd(name, {"id": "nojob"})
        for name in ("block-job-pause", "block-job-resume", "block-job-cancel"):
            await r.cmd(name, {"device": "nojob"})
        await r.cmd("block-job-complete", {"device": "nojob"})
        await r.cmd("block-job-set-speed", {"device": "nojob", "speed": 1})
        await r.cmd("block-job-finalize", {"id": "nojob"})
        await r.cmd("block-job-dismiss", {"id": "nojob"})
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("job-complete", {"id": "j0"})
        await r.cmd("block-job-complete", {"device": "j0"})
        await r.cmd("job-finalize", {"id": "j0"})
        await r.cmd("job-dismiss", {"id": "j0"})
        await r.cmd("job-resume", {"id": "j0"})
        await r.cmd("job-pause", {"bogus": "j0"})
        await r.cmd("job-pause", {"id": "j0", "bogus": 1})
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")

    ref, ours = await compare(tmp_path, scenario)
    for t in (ref, ours):
        for ev in t.events:
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                ev["data"]["offset"] = "*"
    assert_same(ref, ours)


# -- blockdev-backup argument errors (reference 2.1) -------------------------------------------


async def test_backup_argument_type_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", {"job-id": "j0", "device": "src", "target": "tgt"})
        await r.cmd("blockdev-backup", backup_args(sync="fast"))
        await r.cmd("blockdev-backup", backup_args(speed="fast"))
        # Not here: discard-source (QEMU 9.1) and on-cbw-error (10.1), which blockbackup
        # accepts deliberately and 7.2 refuses as unexpected (tests/qmp covers ours).
        await r.cmd("blockdev-backup", backup_args(bogus=1))
        await r.cmd("blockdev-backup", backup_args(compress="yes"))
        await r.cmd("blockdev-backup", backup_args(**{"on-target-error": "explode"}))
        await r.cmd("blockdev-backup", backup_args(**{"x-perf": {"max-workers": "1"}}))
        await r.cmd("blockdev-backup", backup_args(**{"x-perf": {"bogus": 1}}))
        await r.cmd("blockdev-backup", backup_args(**{"x-perf": 5}))
        await r.cmd("blockdev-backup", {"sync": "full", "speed": "x", "bogus": 1})
        await r.cmd("query-jobs")

    await run(tmp_path, scenario)


async def test_backup_node_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(device="nosuch"))
        await r.cmd("blockdev-backup", backup_args(target="nosuch"))
        await r.cmd("blockdev-backup", backup_args(target="src"))
        await r.cmd(
            "blockdev-add",
            {"driver": "file", "node-name": "small", "filename": str(r.dir / "small.img")},
        )
        await r.cmd("blockdev-backup", backup_args(target="small"))
        args = backup_args()
        del args["job-id"]
        await r.cmd("blockdev-backup", args)
        await r.cmd("blockdev-backup", backup_args(**{"job-id": "1abc"}))
        await r.cmd("blockdev-backup", backup_args(**{"job-id": "a#b"}))
        await r.cmd("blockdev-backup", backup_args(speed=-1))
        await r.cmd("blockdev-backup", backup_args(compress=True))
        await r.cmd("query-jobs")

    await run(tmp_path, scenario)


async def test_backup_bitmap_and_perf_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(sync="incremental"))
        await r.cmd("blockdev-backup", backup_args(sync="bitmap"))
        await r.cmd("blockdev-backup", backup_args(**{"bitmap-mode": "always"}))
        await r.cmd("blockdev-backup", backup_args(bitmap="nobm"))
        await r.cmd("blockdev-backup", backup_args(**{"x-perf": {"max-workers": 0}}))
        await r.cmd("blockdev-backup", backup_args(**{"x-perf": {"max-chunk": -1}}))
        await r.cmd("blockdev-backup", backup_args(**{"x-perf": {"max-chunk": 4096}}))
        await r.cmd("query-jobs")

    await run(tmp_path, scenario)


async def test_busy_nodes(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd(
            "blockdev-add",
            {"driver": "file", "node-name": "tgt2", "filename": str(r.dir / "tgt2.img")},
        )
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("blockdev-backup", backup_args(**{"job-id": "j0"}))
        await r.cmd("blockdev-backup", backup_args(**{"job-id": "j1"}))
        await r.cmd(
            "blockdev-backup", backup_args(**{"job-id": "j2", "device": "tgt", "target": "tgt2"})
        )
        await r.cmd("blockdev-del", {"node-name": "srcf"})
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")
        await r.cmd("blockdev-del", {"node-name": "src"})
        await r.cmd("blockdev-del", {"node-name": "srcf"})
        await r.cmd(
            "query-named-block-nodes",
            volatile=("actual-size", "iops_rd", "iops_wr", "bps_rd", "bps_wr"),
        )

    def setup(d: Path) -> None:
        from compat.compat_kit import make_images

        make_images(d)
        with open(d / "tgt2.img", "wb") as f:
            f.truncate(4 * MiB)

    ref, ours = await compare(tmp_path, scenario, setup=setup)
    for t in (ref, ours):
        for ev in t.events:
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                ev["data"]["offset"] = "*"
        for entry in t.replies:
            if entry[0] == "query-named-block-nodes" and "return" in entry[1]:
                for node in entry[1]["return"]:
                    node["image"].pop("actual-size", None)
                    node.pop("dirty-bitmaps", None)
    assert_same(ref, ours)


async def test_blockdev_del_during_backup(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("blockdev-del", {"node-name": "src"})
        await r.cmd("blockdev-del", {"node-name": "tgt"})
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")

    ref, ours = await compare(tmp_path, scenario)
    for t in (ref, ours):
        for ev in t.events:
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                ev["data"]["offset"] = "*"
    assert_same(ref, ours)


async def test_blockdev_add_del_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-add", {"driver": "raw", "node-name": "src", "file": "srcf"})
        await r.cmd("blockdev-add", {"driver": "nosuch", "node-name": "x"})
        await r.cmd("blockdev-add", {"driver": "file", "node-name": "x"})
        await r.cmd("blockdev-add", {"driver": "raw", "file": "srcf"})
        await r.cmd("blockdev-add", {"driver": "raw", "node-name": "x", "file": "nosuch"})
        await r.cmd(
            "blockdev-add",
            {"driver": "file", "node-name": "x", "filename": str(r.dir / "missing.img")},
        )
        await r.cmd(
            "blockdev-add",
            {"driver": "file", "node-name": "x", "filename": str(r.dir / "small.img"), "bogus": 1},
        )
        await r.cmd("blockdev-add", {"driver": "file", "node-name": "x", "filename": 7})
        await r.cmd("blockdev-del", {"node-name": "nosuch"})
        await r.cmd("blockdev-del", {})
        await r.cmd("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1048576})
        await r.cmd("blockdev-del", {"node-name": "n0"})

    await run(tmp_path, scenario)


# -- error policies via blkdebug ----------------------------------------------------------------


def blkdebug_args(d: Path) -> list[str]:
    """tgt = raw over blkdebug (one failing write at byte 1 MiB) over file, keyval syntax."""
    args: list[str] = base_args(d)
    i = args.index(next(a for a in args if '"node-name": "tgt"' in a))
    args[i] = (
        "driver=raw,node-name=tgt,file.driver=blkdebug,file.image.driver=file,"
        f"file.image.filename={d}/tgt.img,file.inject-error.0.event=write_aio,"
        "file.inject-error.0.errno=5,file.inject-error.0.once=on,"
        "file.inject-error.0.sector=2048"
    )
    return args


@pytest.mark.parametrize("policy", ["report", "ignore"])
async def test_target_error_policy(tmp_path: Path, policy: str) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(**{"on-target-error": policy}))
        await r.wait_status("j0", "null")

    ref, ours = await compare(tmp_path, scenario, args=blkdebug_args)
    if policy == "report":
        # How many chunks finished before the failure was seen is a matter of timing in
        # both daemons; only the failed chunk is certain not to count.
        for t in (ref, ours):
            for ev in t.events:
                if ev["event"] == "BLOCK_JOB_COMPLETED":
                    ev["data"]["offset"] = "*"
    assert_same(ref, ours)
    if policy == "ignore":
        same_targets(tmp_path)


async def test_target_error_stop_resume(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(**{"on-target-error": "stop"}))
        await r.wait_event("BLOCK_JOB_ERROR", device="j0")
        await r.wait_status("j0", "paused")
        await r.cmd("query-block-jobs", volatile=("offset", "busy"))
        await r.cmd("job-resume", {"id": "j0"})
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario, args=blkdebug_args)
    same_targets(tmp_path)


# -- shutdown -------------------------------------------------------------------------------------


async def test_quit_with_running_job(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("quit")

    ref, ours = await compare(tmp_path, scenario, quit_at_end=False)
    for t in (ref, ours):
        for ev in t.events:
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                ev["data"]["offset"] = "*"
    assert_same(ref, ours)


# -- exports --------------------------------------------------------------------------------


async def test_exports(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        sock = str(r.dir / "nbd.sock")
        await r.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src"})
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "writable": True}
        )
        await r.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "tgt"})
        await r.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "src"})
        await r.cmd("block-export-add", {"type": "nbd", "id": "e2", "node-name": "nosuch"})
        await r.cmd(
            "block-export-add",
            {"type": "nbd", "id": "e3", "node-name": "tgt", "name": "t", "writable": "yes"},
        )
        await r.cmd("query-block-exports")
        await r.cmd("blockdev-del", {"node-name": "src"})
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("block-export-del", {"id": "nosuch"})
        await r.cmd("block-export-del", {"id": "e0", "mode": "bogus"})
        await r.cmd("block-export-del", {"id": "e0"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="e0")
        await r.cmd("query-block-exports")
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "e4", "node-name": "src", "name": "s4"}
        )
        await r.cmd("quit")

    ref, ours = await compare(tmp_path, scenario, quit_at_end=False)
    for t in (ref, ours):
        for ev in t.events:
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                ev["data"]["offset"] = "*"
    assert_same(ref, ours)


async def test_export_moves_above_filter(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        sock = str(r.dir / "nbd.sock")
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await r.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src"})
        await r.cmd("blockdev-backup", backup_args(speed=SLOW))
        await r.cmd("query-block-exports")
        await r.cmd("quit")

    ref, ours = await compare(tmp_path, scenario, quit_at_end=False)
    for t in (ref, ours):
        for ev in t.events:
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                ev["data"]["offset"] = "*"
    assert_same(ref, ours)


async def test_nbd_server_from_command_line(tmp_path: Path) -> None:
    def args(d: Path) -> list[str]:
        return [
            *base_args(d),
            "--nbd-server",
            f"addr.type=unix,addr.path={d}/nbd.sock",
            "--export",
            "type=nbd,id=e0,node-name=src,name=disk,writable=on",
            "--export",
            json.dumps({"type": "nbd", "id": "e1", "node-name": "tgt"}),
        ]

    async def scenario(r: Recorder) -> None:
        await r.cmd("query-block-exports")
        await r.cmd("nbd-server-stop")
        await r.cmd("query-block-exports")
        await r.cmd("nbd-server-stop")

    await run(tmp_path, scenario, args=args)


async def test_objects(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("object-add", {"qom-type": "secret", "id": "s0", "data": "hunter2"})
        await r.cmd("object-add", {"qom-type": "secret", "id": "s0", "data": "x"})
        await r.cmd("object-add", {"qom-type": "secret", "id": "s1", "bogus": 1})
        await r.cmd("object-add", {"qom-type": "secret", "id": "s2", "format": "hex"})
        await r.cmd("object-add", {"id": "s3"})
        await r.cmd("object-del", {"id": "s0"})
        await r.cmd("object-del", {"id": "s0"})

    await run(tmp_path, scenario)


# -- protocol (raw socket, section 3) -------------------------------------------------------------


PROTOCOL_INPUT = [
    b'{"execute": "query-jobs"}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}',
    b'{"execute": "qmp_capabilities"}',
    b'{"execute": "nonexistent-cmd"}',
    b'{"execute": "query-jobs", "foo": 1}',
    b'{"execute": "query-jobs", "arguments": {"bogus": 1}}',
    b"this\n",
    b"[1, 2]",
    b'"text"',
    b'{"execute": 1}',
    b'{"execute": "query-jobs", "arguments": []}',
    b'{"exec-oob": "query-jobs", "id": 7}',
    b'{"execute": "query-jobs", "exec-oob": "query-jobs"}',
    b'{"id": 5}',
    b'{"execute": "query-jobs", "id": {"x": [1]}}{"execute": "query-block-jobs", "id": "a"}',
    b'{"execute": "query-',
    b'jobs", "id": [1, "two", null]}',
    b'@ {"execute": "query-jobs", "id": 3}',
    b'{"a" 1}',
    b'{"execute": "query-jobs",}',
    b"{'execute': 'query-jobs', 'id': 'single'}",
    b'{"execute": "query-version", "id": 9}',
]


async def _raw_transcript(path: Path) -> list[Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    out: list[Any] = [json.loads(await reader.readline())["QMP"]["capabilities"]]
    for chunk in PROTOCOL_INPUT:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.05)
    writer.write(b'{"execute": "query-jobs", "id": "end"}')
    await writer.drain()
    while True:
        line = await reader.readline()
        assert line.endswith(b"\r\n")
        msg = json.loads(line)
        if "return" in msg and isinstance(msg["return"], dict) and "package" in msg["return"]:
            msg["return"]["package"] = "*"
        out.append(msg)
        if msg.get("id") == "end":
            break
    writer.close()
    return out


async def test_protocol_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        # The qemu.qmp client holds the monitor: free it for the raw client.
        await r.client.disconnect()
        r.note(await _raw_transcript(r.dir / "qmp.sock"))
        r.proc.terminate()

    await run(tmp_path, scenario, quit_at_end=False)


async def test_second_client_waits(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(s, str(r.dir / "qmp.sock"))
            try:
                async with asyncio.timeout(0.5):
                    got = await loop.sock_recv(s, 100)
            except TimeoutError:
                got = b""
            r.note(got.decode())  # no greeting while the first client is connected
            await r.client.disconnect()
            async with asyncio.timeout(5):
                data = await loop.sock_recv(s, 4096)
            r.note(sorted(json.loads(data)["QMP"]))
        r.proc.terminate()

    await run(tmp_path, scenario, quit_at_end=False)
