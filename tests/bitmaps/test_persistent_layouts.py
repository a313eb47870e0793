"""Persistent bitmaps on the most common layout: raw over a whole file (issue 12, fault 4).

``--blockdev driver=file,node-name=disk-file,... --blockdev driver=raw,node-name=disk,
file=disk-file`` (the file child by reference) and ``file: {driver: file, ...}`` (inline,
what ``blockbackup serve`` builds) both store persistent bitmaps of ``disk`` in the sidecar,
and after a restart with the same command line the bitmap is back on ``disk``. Through QMP
against ``blockbackup daemon``; writes through an NBD export with qemu-io.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from testkit.daemon_proc import DaemonProcess, daemon_process

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed"),
]
MiB = 1 << 20
K64 = 65536


def by_reference(tmp: Path) -> list[str]:
    return [
        "--blockdev", f"driver=file,node-name=disk-file,filename={tmp / 'disk.raw'}",
        "--blockdev", "driver=raw,node-name=disk,file=disk-file",
        "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
    ]  # fmt: skip


def inline(tmp: Path) -> list[str]:
    disk = {"driver": "raw", "node-name": "disk",
            "file": {"driver": "file", "filename": str(tmp / "disk.raw")}}  # fmt: skip
    return ["--blockdev", json.dumps(disk),
            "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}"]  # fmt: skip


async def write(d: DaemonProcess, tmp: Path, node: str, offset: str) -> None:
    """Write 64 KiB at ``offset`` through a temporary NBD export of ``node``."""
    await d.cmd(
        "block-export-add",
        {"type": "nbd", "id": "w", "node-name": node, "name": "w", "writable": True},
    )
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", f"nbd+unix:///w?socket={tmp / 'nbd.sock'}",
        "-c", f"write -P 0x5a {offset} 64k",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    await d.cmd("block-export-del", {"id": "w"})
    await d.event("BLOCK_EXPORT_DELETED", id="w")


async def bitmaps(d: DaemonProcess) -> dict[str, Any]:
    """node-name -> its bitmaps as query-named-block-nodes shows them (named nodes only)."""
    nodes = await d.cmd("query-named-block-nodes", {"flat": True})
    return {
        n["node-name"]: [
            {k: b[k] for k in ("name", "persistent", "recording", "count")}
            for b in n.get("dirty-bitmaps", [])
        ]
        for n in nodes
        if not n["node-name"].startswith("#")
    }


def b0(count: int) -> list[dict[str, Any]]:
    return [{"name": "b0", "persistent": True, "recording": True, "count": count}]


@pytest.mark.parametrize("layout", [by_reference, inline], ids=["by-reference", "inline"])
async def test_persistent_bitmap_on_raw_over_a_file_survives_a_restart(
    tmp_path: Path, layout: Any
) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(4 * MiB))
    async with daemon_process(tmp_path, layout(tmp_path)) as d:
        await d.cmd("block-dirty-bitmap-add", {"node": "disk", "name": "b0", "persistent": True})
        await write(d, tmp_path, "disk", "1M")
    assert d.exit_code == 0, d.stderr
    assert (tmp_path / "disk.raw.bbmap").exists()
    async with daemon_process(tmp_path, layout(tmp_path)) as d:
        found = await bitmaps(d)
        assert found["disk"] == b0(K64)
        assert found.get("disk-file", []) == []
        await write(d, tmp_path, "disk", "3M")
        assert (await bitmaps(d))["disk"] == b0(2 * K64)
    assert d.exit_code == 0, d.stderr
    assert "Traceback" not in d.stderr, d.stderr


async def test_file_node_gets_the_bitmaps_back_when_the_raw_node_goes(tmp_path: Path) -> None:
    """Writes to the file node after its raw parent is deleted are still tracked, and a new
    raw node over it takes the bitmap again."""
    (tmp_path / "disk.raw").write_bytes(bytes(4 * MiB))
    async with daemon_process(tmp_path, by_reference(tmp_path)) as d:
        await d.cmd("block-dirty-bitmap-add", {"node": "disk", "name": "b0", "persistent": True})
        await write(d, tmp_path, "disk", "0")
        await d.cmd("blockdev-del", {"node-name": "disk"})
        assert (await bitmaps(d))["disk-file"] == b0(K64)
        await write(d, tmp_path, "disk-file", "2M")
        await d.cmd("blockdev-add", {"driver": "raw", "node-name": "disk2", "file": "disk-file"})
        found = await bitmaps(d)
        assert found["disk2"] == b0(2 * K64)
        assert found["disk-file"] == []
    assert d.exit_code == 0, d.stderr
    assert "Traceback" not in d.stderr, d.stderr


async def test_a_windowed_raw_node_cannot_store_them(tmp_path: Path) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(4 * MiB))
    async with daemon_process(tmp_path, by_reference(tmp_path)) as d:
        await d.cmd(
            "blockdev-add",
            {"driver": "raw", "node-name": "part", "file": "disk-file", "offset": MiB},
        )
        with pytest.raises(ExecuteError, match=r"^Can't store persistent bitmaps to part: "):
            await d.cmd("block-dirty-bitmap-add", {"node": "part", "name": "p", "persistent": True})
        await d.cmd("block-dirty-bitmap-add", {"node": "disk", "name": "b0", "persistent": True})
    assert d.exit_code == 0, d.stderr


async def test_a_bitmap_in_use_stays_on_the_file_node(tmp_path: Path) -> None:
    """The takeover is refused while the file node's bitmap is exported: the raw node
    opened over it then cannot store persistent bitmaps, and nothing moves under the export."""
    (tmp_path / "disk.raw").write_bytes(bytes(4 * MiB))
    file_only = by_reference(tmp_path)[:2] + by_reference(tmp_path)[4:]
    async with daemon_process(tmp_path, file_only) as d:
        await d.cmd(
            "block-dirty-bitmap-add", {"node": "disk-file", "name": "b0", "persistent": True}
        )
        await d.cmd("block-dirty-bitmap-disable", {"node": "disk-file", "name": "b0"})
        await d.cmd(
            "block-export-add",
            {"type": "nbd", "id": "e", "node-name": "disk-file", "bitmaps": ["b0"]},
        )
        await d.cmd("blockdev-add", {"driver": "raw", "node-name": "disk", "file": "disk-file"})
        found = await bitmaps(d)
        assert [b["name"] for b in found["disk-file"]] == ["b0"]
        assert found["disk"] == []
        with pytest.raises(ExecuteError, match=r"^Can't store persistent bitmaps to disk: "):
            await d.cmd(
                "block-dirty-bitmap-add", {"node": "disk", "name": "b1", "persistent": True}
            )
    assert d.exit_code == 0, d.stderr
