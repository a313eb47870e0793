"""Differential fleecing scenarios: qemu-storage-daemon 7.2 and blockbackup must agree.

Why: image fleecing is driven entirely by blockdev-add graphs, exports and NBD clients;
the same QMP script, run against both daemons, must give the same replies, events and
client-visible results (qemu-io texts, ``qemu-img compare`` verdicts, images).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from compat.compat_kit import (
    Recorder,
    assert_same,
    base_args,
    compare,
    env_ok,
    images_identical,
    make_images,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.asyncio,
    pytest.mark.skipif(
        not env_ok() or shutil.which("qemu-io") is None, reason="QEMU tools not installed"
    ),
    pytest.mark.timeout(60),
]


def fleece_images(d: Path) -> None:
    """The usual images, a sparse ``tmp.img``, a copy of ``src`` at T0 and a qcow2 overlay."""
    make_images(d)
    shutil.copyfile(d / "src.img", d / "t0.img")
    with open(d / "tmp.img", "wb") as f:
        f.truncate((d / "src.img").stat().st_size)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(d / "src.img"), "-F", "raw",
         str(d / "ovl.qcow2")],
        check=True,
    )  # fmt: skip


async def tool(*argv: str) -> str:
    """Run a client; its output (stdout and stderr) with timings removed."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    lines = out.decode(errors="replace").splitlines()
    return "\n".join(line for line in lines if "ops/sec" not in line)


def uri(r: Recorder, name: str) -> str:
    return f"nbd+unix:///{name}?socket={r.dir / 'nbd.sock'}"


async def modern_graph(r: Recorder, **cbw: Any) -> None:
    """tmp, cbw (src -> tmp), acc; NBD exports guest (cbw, writable) and snap (acc)."""
    await r.cmd(
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "tmp",
            "discard": "unmap",
            "file": {"driver": "file", "filename": str(r.dir / "tmp.img"), "discard": "unmap"},
        },
    )
    await r.cmd(
        "blockdev-add",
        {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tmp"} | cbw,
    )
    await r.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
    await start_nbd(r)
    await r.cmd(
        "block-export-add",
        {"type": "nbd", "id": "eg", "node-name": "cbw", "name": "guest", "writable": True},
    )
    await r.cmd("block-export-add", {"type": "nbd", "id": "es", "node-name": "acc", "name": "snap"})


async def start_nbd(r: Recorder) -> None:
    sock = str(r.dir / "nbd.sock")
    await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})


async def compare_snapshot(r: Recorder, name: str) -> None:
    """Note whether the export ``name`` equals the T0 copy."""
    out = await tool(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", uri(r, name), str(r.dir / "t0.img")
    )
    r.note([name, out])


async def run(tmp: Path, scenario: Any, **kw: Any) -> None:
    ref, ours = await compare(tmp, scenario, setup=fleece_images, **kw)
    assert_same(ref, ours)


async def test_modern_recipe(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await modern_graph(r)
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x55 0 4M"))
        await compare_snapshot(r, "snap")
        r.note(await tool("qemu-io", "-r", "-f", "raw", uri(r, "snap"), "-c", "read -P 0x55 0 64k"))
        await r.cmd("query-block-exports")
        await r.cmd("blockdev-del", {"node-name": "cbw"})
        await r.cmd("block-export-del", {"id": "es"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="es")
        await r.cmd("blockdev-del", {"node-name": "acc"})

    await run(tmp_path, scenario)
    for sub in ("qsd", "ours"):
        assert (tmp_path / sub / "src.img").read_bytes() == b"\x55" * (4 << 20)


async def test_classic_recipe(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await start_nbd(r)
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "eg", "node-name": "src", "writable": True}
        )
        await r.cmd(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "ovl",
                "file": {"driver": "file", "filename": str(r.dir / "ovl.qcow2")},
                "backing": "src",
            },
        )
        await r.cmd(
            "blockdev-backup", {"job-id": "j0", "device": "src", "target": "ovl", "sync": "none"}
        )
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "ef", "node-name": "ovl", "name": "fleece"}
        )
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "src"), "-c", "write -P 0x66 0 4M"))
        await compare_snapshot(r, "fleece")
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)


async def test_push_backup_from_snapshot_access(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await modern_graph(r)
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x77 1M 2M"))
        await r.cmd(
            "blockdev-backup", {"job-id": "j0", "device": "acc", "target": "tgt", "sync": "full"}
        )
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x78 0 4M"))
        await r.wait_status("j0", "null")

    await run(tmp_path, scenario)
    for sub in ("qsd", "ours"):
        assert images_identical(tmp_path / sub / "tgt.img", tmp_path / sub / "t0.img")


async def test_break_snapshot_and_bitmap_errors(tmp_path: Path) -> None:
    def args(d: Path) -> list[str]:
        out = base_args(d)
        out += [
            "--blockdev",
            "driver=raw,node-name=bad,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={d}/tmp.img,file.inject-error.0.event=write_aio,"
            "file.inject-error.0.errno=5",
        ]
        return out

    async def scenario(r: Recorder) -> None:
        cbw = {"driver": "copy-before-write", "node-name": "c", "file": "src", "target": "bad"}
        await r.cmd("blockdev-add", cbw | {"bitmap": {"node": "src", "name": "nob"}})
        await r.cmd("blockdev-add", cbw | {"bitmap": {"node": "nonode", "name": "nob"}})
        await r.cmd("blockdev-add", cbw | {"cbw-timeout": -1})
        await r.cmd("blockdev-add", cbw | {"on-cbw-error": "foo"})
        await r.cmd("blockdev-add", cbw | {"on-cbw-error": "break-snapshot"})
        await r.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "a", "file": "c"})
        await start_nbd(r)
        await r.cmd(
            "block-export-add",
            {"type": "nbd", "id": "eg", "node-name": "c", "name": "guest", "writable": True},
        )
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "es", "node-name": "a", "name": "snap"}
        )
        r.note(await tool("qemu-io", "-r", "-f", "raw", uri(r, "snap"), "-c", "read -P 0 2M 4k"))
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x33 0 4k"))
        r.note(await tool("qemu-io", "-r", "-f", "raw", uri(r, "snap"), "-c", "read 2M 4k"))

    await run(tmp_path, scenario, args=args)


async def test_throttle_groups_and_filter(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        bad = [
            {"bps-total": 100, "bps-read": 5},
            {"bps-total-max": 100},
            {"bps-total": 100, "bps-total-max": 50},
            {"bps-total": 100, "bps-total-max-length": 5},
            {"bps-total": -1},
            {"iops-total": 1, "iops-total-max": 2, "iops-total-max-length": 0},
            {"bogus": 1},
        ]
        for limits in bad:
            await r.cmd("object-add", {"qom-type": "throttle-group", "id": "g", "limits": limits})
        await r.cmd("object-add", {"qom-type": "throttle-group", "id": "g1", "x-bps-total": 1000})
        await r.cmd(
            "object-add", {"qom-type": "throttle-group", "id": "g", "limits": {"iops-total": 1000}}
        )
        await r.cmd("blockdev-add", {"driver": "throttle", "node-name": "t", "file": "src"})
        await r.cmd(
            "blockdev-add",
            {"driver": "throttle", "node-name": "t", "file": "src", "throttle-group": "nog"},
        )
        await r.cmd(
            "blockdev-add",
            {"driver": "throttle", "node-name": "t", "file": "tgt", "throttle-group": "g"},
        )
        await r.cmd("object-del", {"id": "g"})
        await r.cmd(
            "blockdev-backup", {"job-id": "j0", "device": "src", "target": "t", "sync": "full"}
        )
        await r.wait_status("j0", "null")
        await r.cmd("blockdev-del", {"node-name": "t"})
        await r.cmd("object-del", {"id": "g"})
        await r.cmd("object-del", {"id": "g1"})

    await run(tmp_path, scenario)
    assert images_identical(tmp_path / "ours" / "tgt.img", tmp_path / "ours" / "src.img")


async def test_cbw_timeout_with_throttled_target(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await r.cmd(
            "object-add",
            {"qom-type": "throttle-group", "id": "g", "limits": {"bps-write": 65536}},
        )
        await r.cmd(
            "blockdev-add",
            {
                "driver": "throttle",
                "node-name": "tmp",
                "throttle-group": "g",
                "file": {"driver": "file", "filename": str(r.dir / "tmp.img")},
            },
        )
        await start_nbd(r)
        await r.cmd(
            "block-export-add",
            {"type": "nbd", "id": "et", "node-name": "tmp", "name": "tmp", "writable": True},
        )
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "tmp"), "-c", "write 3M 128k"))
        await r.cmd("block-export-del", {"id": "et"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="et")
        await r.cmd(
            "blockdev-add",
            {
                "driver": "copy-before-write",
                "node-name": "cbw",
                "file": "src",
                "target": "tmp",
                "cbw-timeout": 1,
            },
        )
        await r.cmd(
            "blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}
        )
        await r.cmd(
            "block-export-add",
            {"type": "nbd", "id": "eg", "node-name": "cbw", "name": "guest", "writable": True},
        )
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x11 0 4k"))
        await asyncio.sleep(2)  # let the timed-out copy finish before quitting

    await run(tmp_path, scenario)


async def test_pull_incremental_exports_bitmap_of_the_backing(tmp_path: Path) -> None:
    """libvirt's pull mode: the export is a qcow2 overlay of the disk, and a bitmap named
    plainly in ``bitmaps`` is found on the overlay's backing (the disk), as QEMU walks
    filtered and backing children (issue 12, fault 2)."""

    async def scenario(r: Recorder) -> None:
        await start_nbd(r)
        await r.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        await r.cmd(
            "block-export-add",
            {"type": "nbd", "id": "eg", "node-name": "src", "name": "guest", "writable": True},
        )
        r.note(
            await tool(
                "qemu-io", "-f", "raw", uri(r, "guest"),
                "-c", "write -P 0x55 1M 64k", "-c", "write -P 0x56 3M 128k",
            )
        )  # fmt: skip
        await r.cmd(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "ovl",
                "file": {"driver": "file", "filename": str(r.dir / "ovl.qcow2")},
                "backing": "src",
            },
        )
        actions = [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b0"}},
            {
                "type": "blockdev-backup",
                "data": {"job-id": "j0", "device": "src", "target": "ovl", "sync": "none"},
            },
        ]
        await r.cmd("transaction", {"actions": actions})
        fleece = {"type": "nbd", "id": "ef", "node-name": "ovl", "name": "fleece"}
        await r.cmd("block-export-add", fleece | {"bitmaps": ["nob"]})
        await r.cmd("block-export-add", fleece | {"bitmaps": [{"node": "ovl", "name": "b0"}]})
        await r.cmd("block-export-add", fleece | {"bitmaps": [{"node": "nonode", "name": "b0"}]})
        await r.cmd("block-export-add", fleece | {"bitmaps": ["b1"]})  # enabled, writable disk
        await r.cmd("block-export-add", fleece | {"bitmaps": ["b0"]})
        await r.cmd("query-block-exports")
        again = {"type": "nbd", "id": "e2", "node-name": "ovl", "name": "again"}
        await r.cmd("block-export-add", again | {"bitmaps": ["b0"]})  # busy: exported
        # A guest write after the point in time: copied to the overlay, not in the view.
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x77 1M 4k"))
        r.note(await tool("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri(r, "fleece")))
        r.note(
            await tool("qemu-io", "-r", "-f", "raw", uri(r, "fleece"), "-c", "read -P 0x55 1M 4k")
        )
        opts = (
            f"driver=nbd,export=fleece,server.type=unix,server.path={r.dir / 'nbd.sock'},"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0"
        )
        r.note(await tool("qemu-img", "map", "--output=json", "--image-opts", opts))
        await r.cmd("block-export-del", {"id": "ef"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="ef")
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")
        await r.cmd("blockdev-del", {"node-name": "ovl"})

    await run(tmp_path, scenario)
