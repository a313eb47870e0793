"""``block-export-add`` finds a plainly named bitmap below the exported node (issue 12,
fault 2): on the node, then down its filtered or backing children, as QEMU's
``nbd_export_create`` does. The pull-mode incremental backup depends on it: a qcow2 overlay
backed by the disk is exported with the disk's checkpoint bitmap. Driven through QMP
against ``blockbackup daemon``; the bitmap is read with ``nbdinfo --map`` and ``qemu-img map``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from testkit.daemon_proc import DaemonProcess, daemon_process

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("nbdinfo", "qemu-img", "qemu-io")),
        reason="nbdinfo / qemu-img / qemu-io not installed",
    ),
]
MiB = 1 << 20
K64 = 65536
DIRTY = [(1 * MiB, K64), (3 * MiB, 2 * K64)]


async def tool(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def uri(d: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={d / 'nbd.sock'}"


async def dirty_extents(d: Path, export: str, bitmap: str) -> tuple[list[Any], list[Any]]:
    """The dirty extents as nbdinfo and as qemu-img (x-dirty-bitmap) see them."""
    out = await tool("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri(d, export))
    nbdinfo = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]
    opts = (
        f"driver=nbd,export={export},server.type=unix,server.path={d / 'nbd.sock'},"
        f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    )
    out = await tool("qemu-img", "map", "--output=json", "--image-opts", opts)
    # With x-dirty-bitmap, qemu-img reports dirty areas as "data": false.
    qemu_img = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
    return nbdinfo, qemu_img


def start(tmp: Path) -> Any:
    disk = tmp / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw",
         str(tmp / "scratch.qcow2")],
        check=True,
    )  # fmt: skip
    args = [
        "--blockdev", f"driver=file,node-name=disk-file,filename={disk}",
        "--blockdev", "driver=raw,node-name=disk,file=disk-file",
        "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
    ]  # fmt: skip
    return daemon_process(tmp, args)


async def dirty_b0(d: DaemonProcess, tmp: Path) -> None:
    """b0 on the disk records two guest writes, then stops recording (the checkpoint)."""
    await d.cmd("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
    await d.cmd(
        "block-export-add",
        {"type": "nbd", "id": "eg", "node-name": "disk", "name": "guest", "writable": True},
    )
    await tool(
        "qemu-io", "-f", "raw", uri(tmp, "guest"),
        "-c", "write -P 0x55 1M 64k", "-c", "write -P 0x56 3M 128k",
    )  # fmt: skip
    await d.cmd("block-dirty-bitmap-disable", {"node": "disk", "name": "b0"})


async def test_pull_recipe_exports_the_disk_bitmap_through_the_overlay(tmp_path: Path) -> None:
    async with start(tmp_path) as d:
        await dirty_b0(d, tmp_path)
        await d.cmd(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "scratch",
                "file": {"driver": "file", "filename": str(tmp_path / "scratch.qcow2")},
                "backing": "disk",
            },
        )
        await d.cmd(
            "blockdev-backup",
            {"job-id": "j", "device": "disk", "target": "scratch", "sync": "none"},
        )
        await d.cmd(
            "block-export-add",
            {"type": "nbd", "id": "ef", "node-name": "scratch", "name": "fleece",
             "bitmaps": ["b0"]},
        )  # fmt: skip
        # A write after the point in time changes neither the view nor the exported bitmap.
        await tool("qemu-io", "-f", "raw", uri(tmp_path, "guest"), "-c", "write -P 0x77 0 2M")
        assert await dirty_extents(tmp_path, "fleece", "b0") == (DIRTY, DIRTY)
        await tool(
            "qemu-io", "-r", "-f", "raw", uri(tmp_path, "fleece"),
            "-c", "read -P 0x55 1M 64k", "-c", "read -P 0x56 3M 128k",
        )  # fmt: skip
        await d.cmd("block-export-del", {"id": "ef"})
        await d.event("BLOCK_EXPORT_DELETED", id="ef")
        await d.cmd("job-cancel", {"id": "j"})
        await d.event("BLOCK_JOB_CANCELLED", device="j")
        await d.cmd("blockdev-del", {"node-name": "scratch"})
    assert d.exit_code == 0, d.stderr


async def test_bitmap_found_through_a_filter_not_through_a_format(tmp_path: Path) -> None:
    async with start(tmp_path) as d:
        await dirty_b0(d, tmp_path)
        await d.cmd("object-add", {"qom-type": "throttle-group", "id": "g", "limits": {}})
        await d.cmd(
            "blockdev-add",
            {"driver": "throttle", "node-name": "thr", "throttle-group": "g", "file": "disk"},
        )
        await d.cmd(
            "block-export-add",
            {"type": "nbd", "id": "et", "node-name": "thr", "name": "thr", "bitmaps": ["b0"]},
        )
        assert await dirty_extents(tmp_path, "thr", "b0") == (DIRTY, DIRTY)
        # An enabled bitmap below, on a writable node: QEMU's refusal for a read-only export.
        await d.cmd("block-dirty-bitmap-add", {"node": "disk", "name": "b1"})
        with pytest.raises(ExecuteError, match=r"^Enabled bitmap 'b1' incompatible with readonly"):
            await d.cmd(
                "block-export-add",
                {"type": "nbd", "id": "e1", "node-name": "thr", "name": "t1", "bitmaps": ["b1"]},
            )
        # raw is a format, not a filter: a bitmap of its file child is not looked for.
        await d.cmd("block-dirty-bitmap-add", {"node": "disk-file", "name": "f0"})
        await d.cmd("block-dirty-bitmap-disable", {"node": "disk-file", "name": "f0"})
        with pytest.raises(ExecuteError, match=r"^Bitmap 'f0' is not found$"):
            await d.cmd(
                "block-export-add",
                {"type": "nbd", "id": "e2", "node-name": "thr", "name": "t2", "bitmaps": ["f0"]},
            )
        # The {node, name} form names the node itself: nothing is searched.
        for ref, text in (
            ({"node": "thr", "name": "b0"}, "Dirty bitmap 'b0' not found"),
            ({"node": "nonode", "name": "b0"}, "Node 'nonode' not found"),
        ):
            with pytest.raises(ExecuteError, match=f"^{text}$"):
                await d.cmd(
                    "block-export-add",
                    {"type": "nbd", "id": "e3", "node-name": "thr", "name": "t3",
                     "bitmaps": [ref]},
                )  # fmt: skip
    assert d.exit_code == 0, d.stderr
