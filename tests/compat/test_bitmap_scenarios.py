"""Differential scenarios for dirty bitmaps, bitmap sync modes and transactions.

Each runs against qemu-storage-daemon 7.2 and blockbackup (see ``compat_kit``); writes
reach the source through a writable NBD export with ``qemu-io``, as a guest's would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from compat.compat_kit import Recorder, assert_same, base_args, compare, env_ok

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.asyncio,
    pytest.mark.skipif(not env_ok(), reason="qemu-storage-daemon / qemu-img not installed"),
    pytest.mark.timeout(60),
]


async def run(tmp: Path, scenario: Any, **kw: Any) -> tuple[Any, Any]:
    ref, ours = await compare(tmp, scenario, **kw)
    assert_same(ref, ours)
    return ref, ours


async def export_src(r: Recorder) -> None:
    sock = str(r.dir / "nbd.sock")
    await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await r.cmd(
        "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
    )


async def qemu_io(r: Recorder, *commands: str) -> None:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    proc = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        *args,
        f"nbd+unix:///src?socket={r.dir}/nbd.sock",
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await proc.wait() == 0


async def bitmaps(r: Recorder, node: str = "src") -> None:
    """Record the node's named bitmaps (QEMU also lists job-internal anonymous ones)."""
    nodes = await r.client.execute("query-named-block-nodes")
    for n in nodes:
        if n["node-name"] == node:
            r.note([b for b in n.get("dirty-bitmaps", ["ABSENT"]) if b == "ABSENT" or "name" in b])


def blkdebug_args(d: Path) -> list[str]:
    """tgt = raw over blkdebug failing every write at 1 MiB."""
    args = base_args(d)
    i = args.index("--chardev")
    return [
        *args[:i],
        "--blockdev",
        json.dumps(
            {
                "driver": "raw",
                "node-name": "tgtd",
                "file": {
                    "driver": "blkdebug",
                    "image": {"driver": "file", "filename": f"{d}/tgt.img"},
                    "inject-error": [{"event": "write_aio", "errno": 5, "sector": 2048}],
                },
            }
        ),
        *args[i:],
    ]


async def test_bitmap_command_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        add = "block-dirty-bitmap-add"
        await bitmaps(r)
        await r.cmd(add, {"node": "src", "name": "b0"})
        await r.cmd(add, {"node": "src", "name": "b1", "disabled": True, "granularity": 4096})
        await r.cmd(add, {"node": "src", "name": "b0"})
        await r.cmd(add, {"node": "src", "name": ""})
        await r.cmd(add, {"node": "src", "name": "x" * 1024})
        await r.cmd(add, {"node": "src", "name": "x", "granularity": 1000})
        await r.cmd(add, {"node": "src", "name": "x", "granularity": 256})
        await r.cmd(add, {"node": "src", "name": "x", "granularity": 1 << 32})
        await r.cmd(add, {"node": "src", "name": "x", "granularity": -1})
        await r.cmd(add, {"node": "src", "name": "big", "granularity": 1 << 31})
        # A node that can store none in either daemon. (raw over a whole file stores them
        # here, in a sidecar: a deliberate difference, tests/bitmaps/test_persistent_layouts.)
        await r.cmd("blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 1 << 20})
        await r.cmd(add, {"node": "nul", "name": "p", "persistent": True})
        await r.cmd(add, {"node": "nosuch", "name": "y"})
        for cmd in ("remove", "clear", "enable", "disable"):
            await r.cmd(f"block-dirty-bitmap-{cmd}", {"node": "src", "name": "nosuch"})
            await r.cmd(f"block-dirty-bitmap-{cmd}", {"node": "nosuch", "name": "b0"})
        await r.cmd("block-dirty-bitmap-enable", {"node": "src", "name": "b0"})
        await r.cmd("block-dirty-bitmap-disable", {"node": "src", "name": "b1"})
        merge = "block-dirty-bitmap-merge"
        await r.cmd(merge, {"node": "src", "target": "nosuch", "bitmaps": ["b0"]})
        await r.cmd(merge, {"node": "src", "target": "b0", "bitmaps": ["nosuch"]})
        await r.cmd(
            merge, {"node": "src", "target": "b0", "bitmaps": [{"node": "nosuch", "name": "x"}]}
        )
        await r.cmd(merge, {"node": "src", "target": "b1", "bitmaps": ["b0", "big"]})
        await r.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b1"})
        await r.cmd("block-dirty-bitmap-remove", {"node": "src", "name": "big"})
        await bitmaps(r)

    await run(tmp_path, scenario)


async def _incremental(
    r: Recorder, *, mode: str | None, sync: str = "incremental", fail: bool = False
) -> None:
    await export_src(r)
    await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
    await qemu_io(r, "write -P 1 0 1k", "write -P 2 1M 100k")  # 3 clusters: 196608
    await bitmaps(r)
    args: dict[str, Any] = {
        "job-id": "j",
        "device": "src",
        "target": "tgtd" if fail else "tgt",
        "sync": sync,
        "bitmap": "b0",
    }
    if mode is not None:
        args["bitmap-mode"] = mode
    await r.cmd("blockdev-backup", args)
    await r.wait_status("j", "null")
    await bitmaps(r)
    await r.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b0"})


async def test_incremental_success_clears(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await _incremental(r, mode=None)

    await run(tmp_path, scenario)


async def test_incremental_failure_keeps_bits(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await _incremental(r, mode=None, fail=True)

    await run(tmp_path, scenario, args=blkdebug_args)


async def test_bitmap_always_on_failure(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await _incremental(r, mode="always", sync="bitmap", fail=True)

    await run(tmp_path, scenario, args=blkdebug_args)


async def test_bitmap_never(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await _incremental(r, mode="never", sync="bitmap")

    await run(tmp_path, scenario)


async def test_full_with_bitmap_output_and_arg_errors(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        base = {"job-id": "j", "device": "src", "target": "tgt"}
        await r.cmd("blockdev-backup", {**base, "sync": "incremental"})
        await r.cmd("blockdev-backup", {**base, "sync": "bitmap"})
        await r.cmd("blockdev-backup", {**base, "sync": "full", "bitmap-mode": "always"})
        await r.cmd(
            "blockdev-backup", {**base, "sync": "full", "bitmap": "nobm", "bitmap-mode": "always"}
        )
        await _incremental_errors(r, base)
        await r.cmd(
            "blockdev-backup", {**base, "sync": "full", "bitmap": "b0", "bitmap-mode": "on-success"}
        )
        await r.wait_status("j", "null")
        await bitmaps(r)

    await run(tmp_path, scenario)


async def _incremental_errors(r: Recorder, base: dict[str, Any]) -> None:
    await export_src(r)
    await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
    await qemu_io(r, "write -P 1 64k 1k")
    for extra in (
        {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"},
        {"sync": "bitmap", "bitmap": "b0"},
        {"sync": "none", "bitmap": "b0", "bitmap-mode": "on-success"},
        {"sync": "full", "bitmap": "b0", "bitmap-mode": "never"},
        {"sync": "top", "bitmap": "b0", "bitmap-mode": "never"},
    ):
        await r.cmd("blockdev-backup", {**base, **extra})


async def test_busy_bitmap(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await export_src(r)
        await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b2", "disabled": True})
        await qemu_io(r, "write -P 1 0 1k", "write -P 2 1M 100k")
        await r.cmd(
            "blockdev-backup",
            {
                "job-id": "j",
                "device": "src",
                "target": "tgt",
                "sync": "incremental",
                "bitmap": "b0",
                "speed": 1024,
            },
        )
        for cmd in ("remove", "clear", "enable", "disable"):
            await r.cmd(f"block-dirty-bitmap-{cmd}", {"node": "src", "name": "b0"})
        await r.cmd("block-dirty-bitmap-merge", {"node": "src", "target": "b2", "bitmaps": ["b0"]})
        await r.cmd(
            "blockdev-backup",
            {
                "job-id": "j2",
                "device": "src",
                "target": "tgt",
                "sync": "bitmap",
                "bitmap": "b0",
                "bitmap-mode": "never",
            },
        )
        await bitmaps(r)
        await qemu_io(r, "write -P 3 3M 64k")
        await r.cmd("job-cancel", {"id": "j"})
        await r.wait_status("j", "null")
        await bitmaps(r)

    await run(tmp_path, scenario)


async def test_transaction_abort_rolls_back(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await export_src(r)
        await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b2", "disabled": True})
        await qemu_io(r, "write -P 1 0 1k")
        await r.cmd(
            "transaction",
            {
                "actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
                    {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b0"}},
                    {"type": "block-dirty-bitmap-enable", "data": {"node": "src", "name": "b2"}},
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {"node": "src", "target": "b2", "bitmaps": ["b0"]},
                    },
                    {
                        "type": "blockdev-backup",
                        "data": {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"},
                    },
                    {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b0"}},
                    {"type": "abort", "data": {}},
                ]
            },
        )
        await bitmaps(r)
        await r.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b2"})
        await r.cmd(
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
        await r.cmd(
            "transaction",
            {
                "actions": [
                    {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b2"}},
                    {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b2"}},
                ]
            },
        )
        await r.cmd("transaction", {"actions": [], "properties": {"completion-mode": "bogus"}})
        await r.cmd("transaction", {"actions": [{"type": "bogus", "data": {}}]})
        await r.cmd("transaction", {"actions": [{"type": "abort"}]})
        await r.cmd("transaction", {"actions": []})
        await bitmaps(r)

    await run(tmp_path, scenario)


async def test_transaction_grouped(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd("blockdev-add", {"driver": "null-co", "node-name": "n1", "size": 4 << 20})
        await r.cmd("blockdev-add", {"driver": "null-co", "node-name": "n2", "size": 4 << 20})
        grouped = {"completion-mode": "grouped"}
        await r.cmd(
            "transaction",
            {
                "actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
                ],
                "properties": grouped,
            },
        )
        await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        await r.cmd(
            "transaction",
            {
                "actions": [
                    {
                        "type": "blockdev-backup",
                        "data": {
                            "job-id": "ja",
                            "device": "src",
                            "target": "tgtd",
                            "sync": "full",
                            "bitmap": "b0",
                            "bitmap-mode": "on-success",
                        },
                    },
                    {
                        "type": "blockdev-backup",
                        "data": {
                            "job-id": "jb",
                            "device": "n1",
                            "target": "n2",
                            "sync": "full",
                            "speed": 65536,
                        },
                    },
                ],
                "properties": {"completion-mode": "grouped"},
            },
        )
        async with asyncio.timeout(20):
            while await r.client.execute("query-jobs"):
                await asyncio.sleep(0.05)
        await bitmaps(r)

    ref, ours = await compare(tmp_path, scenario, args=blkdebug_args)
    for t in (ref, ours):  # where the cancelled sibling was is timing
        for ev in t.events:
            if ev["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"):
                ev["data"]["offset"] = "*"
    assert_same(ref, ours)
