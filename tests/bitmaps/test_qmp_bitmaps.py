"""Bitmap commands, transactions and bitmap exports through the daemon's QMP handlers.

Commands run through :meth:`Daemon.execute` (the same validation and handlers a QMP
session uses); the export test runs the daemon's NBD server and reads the bitmap with
``nbdinfo`` and ``qemu-img map``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.block.drivers.blkdebug import BlkdebugDriver, IOType
from blockbackup.daemon import Daemon
from blockbackup.errors import BlockBackupError
from blockbackup.jobs.status import JobStatus
from testkit.images import make_image, raw_node, read_file

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
SIZE = 4 << 20
K64 = 65536


@contextlib.asynccontextmanager
async def daemon_with(tmp: Path, *names: str) -> AsyncIterator[Daemon]:
    d = Daemon()
    try:
        for name in names:
            path = make_image(tmp / f"{name}.img", SIZE, [(0, os.urandom(SIZE))])
            await d.execute(
                "blockdev-add",
                {"driver": "blkdebug", "node-name": name, "image": raw_node(f"{name}-raw", path)},
            )
        yield d
    finally:
        await d.jobs.aclose()
        await d.graph.aclose()


async def err(d: Daemon, name: str, args: dict[str, Any]) -> str:
    with pytest.raises(BlockBackupError) as info:
        await d.execute(name, args)
    return str(info.value)


def bitmap_list(d: Daemon, node: str) -> Any:
    return [bm.info() for bm in reversed(list(bitmaps_of(d.graph.get(node))))]


async def test_bitmap_command_texts(tmp_path: Path) -> None:
    async with daemon_with(tmp_path, "src", "tgt") as d:
        add = "block-dirty-bitmap-add"
        await d.execute(add, {"node": "src", "name": "b0"})
        await d.execute(add, {"node": "src", "name": "b1", "disabled": True, "granularity": 4096})
        assert await err(d, add, {"node": "src", "name": "b0"}) == "Bitmap already exists: b0"
        assert await err(d, add, {"node": "src", "name": ""}) == "Bitmap name cannot be empty"
        for g in (1000, 256, 0):
            assert await err(d, add, {"node": "src", "name": "x", "granularity": g}) == (
                "Granularity must be power of 2 and at least 512"
            )
        assert await err(d, add, {"node": "src", "name": "x", "granularity": 1 << 32}) == (
            "Parameter 'granularity' expects uint32_t"
        )
        assert await err(d, add, {"node": "src", "name": "p", "persistent": True}) == (
            "Can't store persistent bitmaps to src: Operation not supported"
        )
        assert await err(d, add, {"node": "nosuch", "name": "y"}) == (
            "Cannot find device='nosuch' nor node-name='nosuch'"
        )
        for cmd in ("remove", "clear", "enable", "disable"):
            assert await err(d, f"block-dirty-bitmap-{cmd}", {"node": "src", "name": "no"}) == (
                "Dirty bitmap 'no' not found"
            )
            assert await err(d, f"block-dirty-bitmap-{cmd}", {"node": "no", "name": "b0"}) == (
                "Node 'no' not found"
            )
        merge = "block-dirty-bitmap-merge"
        assert await err(d, merge, {"node": "src", "target": "no", "bitmaps": ["b0"]}) == (
            "Dirty bitmap 'no' not found"
        )
        assert await err(
            d, merge, {"node": "src", "target": "b0", "bitmaps": [{"node": "tgt", "name": "b0"}]}
        ) == ("Dirty bitmap 'b0' not found")
        await d.graph.get("src").write(0, b"x")
        await d.execute(merge, {"node": "src", "target": "b1", "bitmaps": ["b0"]})
        await d.execute("block-dirty-bitmap-enable", {"node": "src", "name": "b0"})  # idempotent
        assert bitmap_list(d, "src") == [
            {
                "name": "b1",
                "recording": False,
                "persistent": False,
                "busy": False,
                "granularity": 4096,
                "count": K64,
            },
            {
                "name": "b0",
                "recording": True,
                "persistent": False,
                "busy": False,
                "granularity": K64,
                "count": K64,
            },
        ]
        sha = await d.execute("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b1"})
        assert len(sha["sha256"]) == 64
        nodes = await d.execute("query-named-block-nodes", {})
        by_name = {n["node-name"]: n for n in nodes}
        assert "dirty-bitmaps" not in by_name["tgt"]
        assert by_name["src"]["dirty-bitmaps"] == bitmap_list(d, "src")
        # Busy while a backup holds it.
        await d.execute(
            "blockdev-backup",
            {
                "job-id": "j",
                "device": "src",
                "target": "tgt",
                "sync": "incremental",
                "bitmap": "b0",
                "speed": 1,
            },
        )
        busy = "Bitmap 'b0' is currently in use by another operation and cannot be used"
        for cmd in ("remove", "clear", "enable", "disable"):
            assert await err(d, f"block-dirty-bitmap-{cmd}", {"node": "src", "name": "b0"}) == busy
        assert await err(d, merge, {"node": "src", "target": "b1", "bitmaps": ["b0"]}) == busy
        info = bitmap_list(d, "src")
        assert info[0] == {
            "recording": True,
            "persistent": False,
            "busy": False,
            "granularity": K64,
            "count": 0,
        }  # the successor
        assert info[-1]["busy"] is True
        assert info[-1]["count"] == K64
        await d.execute("job-cancel", {"id": "j"})
        await d.jobs.wait_concluded(d.jobs.jobs[0]) if d.jobs.jobs else None
        await d.execute("block-dirty-bitmap-remove", {"node": "src", "name": "b0"})
        assert [b["name"] for b in bitmap_list(d, "src")] == ["b1"]


async def test_transaction_rolls_back_every_action(tmp_path: Path) -> None:
    async with daemon_with(tmp_path, "src", "tgt") as d:
        await d.execute("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        await d.execute("block-dirty-bitmap-add", {"node": "src", "name": "b2", "disabled": True})
        await d.graph.get("src").write(K64, b"x")
        before = bitmap_list(d, "src")
        sha = await d.execute("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b2"})
        with d.events.subscribe() as sub:
            text = await err(
                d,
                "transaction",
                {
                    "actions": [
                        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
                        {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b0"}},
                        {
                            "type": "block-dirty-bitmap-enable",
                            "data": {"node": "src", "name": "b2"},
                        },
                        {
                            "type": "block-dirty-bitmap-merge",
                            "data": {"node": "src", "target": "b2", "bitmaps": ["b0"]},
                        },
                        {
                            "type": "blockdev-backup",
                            "data": {
                                "job-id": "j",
                                "device": "src",
                                "target": "tgt",
                                "sync": "full",
                            },
                        },
                        {
                            "type": "block-dirty-bitmap-remove",
                            "data": {"node": "src", "name": "b0"},
                        },
                        {"type": "abort", "data": {}},
                    ]
                },
            )
            await asyncio.sleep(0.05)
            events = [e["data"]["status"] for e in sub.drain() if e["event"] == "JOB_STATUS_CHANGE"]
        assert text == "Transaction aborted using Abort action"
        assert events == ["created", "aborting", "concluded", "null"]
        assert bitmap_list(d, "src") == before
        assert (
            await d.execute("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b2"})
            == sha
        )
        assert not d.graph.get("src")._before_write
        assert not d.jobs.jobs
        # A failing later action undoes the earlier ones, with its own error.
        assert (
            await err(
                d,
                "transaction",
                {
                    "actions": [
                        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
                        {
                            "type": "blockdev-backup",
                            "data": {
                                "job-id": "k",
                                "device": "src",
                                "target": "nosuch",
                                "sync": "full",
                            },
                        },
                    ]
                },
            )
            == "Cannot find device='nosuch' nor node-name='nosuch'"
        )
        assert bitmap_list(d, "src") == before
        assert (
            await err(
                d,
                "transaction",
                {
                    "actions": [
                        {
                            "type": "block-dirty-bitmap-remove",
                            "data": {"node": "src", "name": "b2"},
                        },
                        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b2"}},
                    ]
                },
            )
            == "Bitmap already exists: b2"
        )
        assert bitmap_list(d, "src") == before
        assert (
            await err(d, "transaction", {"actions": [], "properties": {"completion-mode": "bogus"}})
            == "Parameter 'completion-mode' does not accept value 'bogus'"
        )
        await d.execute("transaction", {"actions": []})


async def test_grouped_failure_cancels_the_sibling(tmp_path: Path) -> None:
    async with daemon_with(tmp_path, "a", "b", "ta", "tb") as d:
        tb = d.graph.get("tb").driver
        assert isinstance(tb, BlkdebugDriver)
        tb.add_rule(IOType.WRITE, errno.EIO, offset=2 << 20, length=4096)
        for n in ("a", "b"):
            await d.execute("block-dirty-bitmap-add", {"node": n, "name": "bm"})
            await d.graph.get(n).write(0, b"x" * 10)
            await d.graph.get(n).write(2 << 20, b"x" * 10)
        with d.events.subscribe() as sub:
            await d.execute(
                "transaction",
                {
                    "actions": [
                        {
                            "type": "blockdev-backup",
                            "data": {
                                "job-id": "ja",
                                "device": "a",
                                "target": "ta",
                                "sync": "incremental",
                                "bitmap": "bm",
                                "speed": 65536,
                            },
                        },
                        {
                            "type": "blockdev-backup",
                            "data": {
                                "job-id": "jb",
                                "device": "b",
                                "target": "tb",
                                "sync": "incremental",
                                "bitmap": "bm",
                            },
                        },
                    ],
                    "properties": {"completion-mode": "grouped"},
                },
            )
            while d.jobs.jobs:
                await asyncio.sleep(0.01)
            events = sub.drain()
        final = {e["data"]["device"]: e for e in events if e["event"].startswith("BLOCK_JOB_C")}
        assert final["jb"]["event"] == "BLOCK_JOB_COMPLETED"
        assert final["jb"]["data"]["error"] == "Input/output error"
        assert final["ja"]["event"] == "BLOCK_JOB_CANCELLED"
        for n in ("a", "b"):  # on-success, failed: both bitmaps keep their bits
            assert bitmaps_of(d.graph.get(n)).get("bm").count == 2 * K64  # type: ignore[union-attr]


async def test_transaction_shares_one_point_in_time(tmp_path: Path) -> None:
    """Writes go A then B (counter k in slot k) while a transaction backs up both."""
    async with daemon_with(tmp_path, "a", "b", "ta", "tb") as d:
        a, b = d.graph.get("a"), d.graph.get("b")
        for n in (a, b):
            await n.write_zeroes(0, SIZE)
        slots = SIZE // 4096
        started = asyncio.Event()
        cut = asyncio.Event()

        async def writer() -> None:
            for k in range(1, slots):
                if k == slots - 2:
                    await cut.wait()  # however fast writes are, the cut lands mid-stream
                data = struct.pack("<Q", k) * 512
                await a.write(k * 4096, data)
                await b.write(k * 4096, data)
                if k == 40:
                    started.set()

        task = asyncio.create_task(writer())
        await started.wait()
        await d.execute(
            "transaction",
            {
                "actions": [
                    {
                        "type": "blockdev-backup",
                        "data": {"job-id": "ja", "device": "a", "target": "ta", "sync": "full"},
                    },
                    {
                        "type": "blockdev-backup",
                        "data": {"job-id": "jb", "device": "b", "target": "tb", "sync": "full"},
                    },
                ]
            },
        )
        cut.set()
        while d.jobs.jobs:
            await asyncio.sleep(0.01)
        await task

        def present(path: Path) -> set[int]:
            data = read_file(path)
            return {k for k in range(1, slots) if struct.unpack_from("<Q", data, k * 4096)[0] == k}

        got_a, got_b = present(tmp_path / "ta.img"), present(tmp_path / "tb.img")
        na, nb = len(got_a), len(got_b)
        assert got_a == set(range(1, na + 1))
        assert got_b == set(range(1, nb + 1))
        assert 40 <= nb <= na <= nb + 1, (na, nb)  # B_k needs A_k; A_k+1 needs B_k
        assert na < slots - 1  # the cut was taken while writing


NBDINFO = shutil.which("nbdinfo")
QEMU_IMG = shutil.which("qemu-img")


@pytest.mark.skipif(not (NBDINFO and QEMU_IMG), reason="nbdinfo / qemu-img not installed")
async def test_export_shows_exactly_the_changed_clusters(tmp_path: Path) -> None:
    async with daemon_with(tmp_path, "src") as d:
        sock = tmp_path / "nbd.sock"
        await d.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        await d.execute("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        await d.execute(
            "block-export-add",
            {"type": "nbd", "id": "w", "node-name": "src", "name": "w", "writable": True},
        )
        url = f"nbd+unix:///w?socket={sock}"
        proc = await asyncio.create_subprocess_exec(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write 65536 4096",
            "-c",
            "write 1M 128k",
            url,
            stdout=subprocess.DEVNULL,
        )
        assert await proc.wait() == 0
        await d.execute("block-dirty-bitmap-disable", {"node": "src", "name": "b0"})
        await d.execute(
            "block-export-add",
            {"type": "nbd", "id": "r", "node-name": "src", "name": "r", "bitmaps": ["b0"]},
        )
        expect = [(65536, 65536), (1 << 20, 131072)]
        proc = await asyncio.create_subprocess_exec(
            "nbdinfo",
            "--json",
            "--map=qemu:dirty-bitmap:b0",
            f"nbd+unix:///r?socket={sock}",
            stdout=subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        extents = json.loads(out)
        dirty = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
        assert dirty == expect
        opts = (
            f"driver=nbd,server.type=unix,server.path={sock},export=r,"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0"
        )
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "map", "--output=json", "--image-opts", opts, stdout=subprocess.PIPE
        )
        out, _ = await proc.communicate()
        # With x-dirty-bitmap, qemu-img reports dirty areas as "data": false.
        mapped = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
        assert mapped == expect
        assert d.jobs.jobs == [] or all(j.status is JobStatus.NULL for j in d.jobs.jobs)
        await d.execute("nbd-server-stop", {})
