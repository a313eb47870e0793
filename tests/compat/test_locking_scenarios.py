"""Differential scenarios for image locking (issue #12, fault 7).

Both daemons run the same scenario; the notes compare what the *kernel* says each holds
(the lock bytes in ``/proc/locks``) and what QEMU's own tools are told when they open an
image a daemon uses, so that blockbackup takes exactly the locks qemu-storage-daemon 7.2
takes, at every step, and refuses with the same texts.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compat.compat_kit import OURS, QSD, MiB, Recorder, assert_same, compare, env_ok, make_images
from testkit.locks import DaemonHolder, QemuIoHolder, lock_bytes, wait_for_locks

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.asyncio,
    pytest.mark.skipif(not env_ok(), reason="qemu-storage-daemon / qemu-img not installed"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/locks is Linux's"),
    pytest.mark.timeout(60),
]


def setup(d: Path) -> None:
    make_images(d)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "1M"], check=True
    )


def qcow2(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    file: dict[str, Any] = {"driver": "file", "filename": str(path)}
    file.update(extra.pop("file", {}))
    return {"driver": "qcow2", "node-name": name, "file": file, **extra}


async def tool(*argv: str | Path) -> list[Any]:
    """Run a QEMU tool; its exit status and error output (success output has timings)."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):  # a daemon that should have refused keeps running
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return [proc.returncode, err.decode()]


def note_locks(r: Recorder, *names: str) -> None:
    r.note({name: sorted(lock_bytes(r.dir / name)) for name in names})


async def test_qcow2_one_writer(tmp_path: Path) -> None:
    """qcow2 unshares write and resize of its file: a second writer (in the daemon or in
    qemu-io) is refused, read-only opens only with force-share; locking=off takes none;
    blockdev-del drops the locks."""

    async def scenario(r: Recorder) -> None:
        disk = r.dir / "disk.qcow2"
        await r.cmd("blockdev-add", qcow2("q1", disk))
        note_locks(r, "disk.qcow2")
        await r.cmd("blockdev-add", qcow2("q2", disk))
        await r.cmd("blockdev-add", qcow2("q3", disk, **{"read-only": True}))
        await r.cmd("blockdev-add", qcow2("q4", disk, **{"read-only": True, "force-share": True}))
        note_locks(r, "disk.qcow2")
        await r.cmd("blockdev-add", qcow2("q5", disk, file={"locking": "maybe"}))
        await r.cmd("blockdev-add", qcow2("q5", disk, **{"force-share": True}))
        await r.cmd("blockdev-add", qcow2("q6", disk, file={"locking": "off"}))
        note_locks(r, "disk.qcow2")
        sock = str(r.dir / "nbd.sock")
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "e1", "node-name": "q1", "writable": True}
        )
        note_locks(r, "disk.qcow2")
        r.note(await tool("qemu-io", "-f", "qcow2", "-c", "write 0 4k", disk))
        r.note(await tool("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 4k", disk))
        r.note(await tool("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read 0 4k", disk))
        await r.cmd("blockdev-del", {"node-name": "q1"})
        await r.cmd("block-export-del", {"id": "e1"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="e1")
        await r.cmd("blockdev-del", {"node-name": "q1"})
        await r.cmd("blockdev-del", {"node-name": "q6"})
        note_locks(r, "disk.qcow2")
        await r.cmd("blockdev-del", {"node-name": "q4"})
        note_locks(r, "disk.qcow2")
        r.note(await tool("qemu-io", "-f", "qcow2", "-c", "write 0 4k", disk))

    await compare_and_check(tmp_path, scenario)


async def test_another_process_holds_the_image(tmp_path: Path) -> None:
    """A qemu-io that has the image open read-write: blockdev-add refused with QEMU's
    texts, nothing left behind; once it exits, the same blockdev-add succeeds."""

    async def scenario(r: Recorder) -> None:
        disk = r.dir / "disk.qcow2"
        holder = await asyncio.to_thread(QemuIoHolder, disk, "qcow2")
        try:
            await r.cmd("blockdev-add", qcow2("q1", disk))
            await r.cmd("blockdev-add", qcow2("q1", disk, **{"read-only": True}))
            await r.cmd("query-named-block-nodes")
            await r.cmd(
                "blockdev-add", qcow2("q1", disk, **{"read-only": True, "force-share": True})
            )
            await r.cmd("blockdev-del", {"node-name": "q1"})
        finally:
            await asyncio.to_thread(holder.close)
        note_locks(r, "disk.qcow2")
        await r.cmd("blockdev-add", qcow2("q1", disk))
        note_locks(r, "disk.qcow2")

    await compare_and_check(tmp_path, scenario)


async def test_raw_export_and_backup(tmp_path: Path) -> None:
    """Raw over a file shares write; a backup protects its source from other writers and
    its target from resizing, and gives both back when it ends."""

    async def scenario(r: Recorder) -> None:
        sock = str(r.dir / "nbd.sock")
        src, tgt = r.dir / "src.img", r.dir / "tgt.img"
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await r.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src"})
        note_locks(r, "src.img", "tgt.img")
        await r.cmd("block-export-del", {"id": "e0"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="e0")
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "e1", "node-name": "src", "writable": True}
        )
        note_locks(r, "src.img", "tgt.img")
        r.note(await tool("qemu-io", "-f", "raw", "-c", "write 0 4k", src))
        r.note(await tool("qemu-img", "resize", "-f", "raw", src, str(4 * MiB)))
        args = {"job-id": "j0", "device": "src", "target": "tgt", "sync": "none"}
        await r.cmd("blockdev-backup", args)
        note_locks(r, "src.img", "tgt.img")
        r.note(await tool("qemu-io", "-f", "raw", "-c", "write 0 4k", src))
        r.note(await tool("qemu-io", "-f", "raw", "-c", "write 0 4k", tgt))
        r.note(await tool("qemu-img", "resize", "-f", "raw", tgt, str(4 * MiB)))
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")
        note_locks(r, "src.img", "tgt.img")
        await r.cmd("block-export-del", {"id": "e1"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="e1")
        note_locks(r, "src.img", "tgt.img")

    ref, ours = await compare(tmp_path, scenario, setup=setup)
    assert_same(ref, ours)
    # Every lock is gone with the daemon.
    for d in ("qsd", "ours"):
        assert not lock_bytes(tmp_path / d / "src.img")


async def test_backup_of_an_image_another_process_writes(tmp_path: Path) -> None:
    """A backup must keep its source from other writers: refused while qemu-io writes
    it (nothing of the backup left), accepted once it is gone."""

    async def scenario(r: Recorder) -> None:
        args = {"job-id": "j0", "device": "src", "target": "tgt", "sync": "none"}
        holder = await asyncio.to_thread(QemuIoHolder, r.dir / "src.img", "raw")
        try:
            note_locks(r, "src.img", "tgt.img")
            await r.cmd("blockdev-backup", args)
            await r.wait_status("j0", "null")  # created, then refused: null
            await r.cmd("query-jobs")
            await r.cmd("query-named-block-nodes")
        finally:
            await asyncio.to_thread(holder.close)
        note_locks(r, "src.img", "tgt.img")
        await r.cmd("blockdev-backup", args)
        note_locks(r, "src.img", "tgt.img")
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")
        note_locks(r, "src.img", "tgt.img")

    ref, ours = await compare(tmp_path, scenario, setup=setup)
    for t in (ref, ours):
        for entry in t.replies:
            if entry[0] == "query-named-block-nodes" and "return" in entry[1]:
                entry[1] = {"return": sorted(n["node-name"] for n in entry[1]["return"])}
    assert_same(ref, ours)


async def test_conflicts_within_one_daemon(tmp_path: Path) -> None:
    """Users of one node in one daemon are checked against each other (one open file:
    the locks cannot see it), with QEMU's texts: two qcow2 nodes on one file node, a
    writer below a qcow2, a writable export below a blkdebug that unshares write, a
    snapshot-access making a copy-before-write protect a source exported writable."""

    async def scenario(r: Recorder) -> None:
        disk = str(r.dir / "disk.qcow2")
        add = {"driver": "file", "node-name": "f", "filename": disk}
        await r.cmd("blockdev-add", add)
        await r.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "f"})
        await r.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": "f"})
        await r.cmd("blockdev-add", {"driver": "raw", "node-name": "r2", "file": "f"})
        sock = str(r.dir / "nbd.sock")
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        for i, node in enumerate(("r2", "f")):
            export = {"type": "nbd", "id": f"e{i}", "node-name": node, "writable": True}
            await r.cmd("block-export-add", export)
        ro = {"driver": "qcow2", "node-name": "q3", "file": "f", "read-only": True}
        await r.cmd("blockdev-add", ro)
        await r.cmd(
            "blockdev-add",
            {
                "driver": "blkdebug",
                "node-name": "d1",
                "image": "srcf",
                "unshare-child-perms": ["write"],
            },
        )
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "e2", "node-name": "src", "writable": True}
        )
        await r.cmd("blockdev-del", {"node-name": "d1"})
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "e3", "node-name": "src", "writable": True}
        )
        cbw = {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt"}
        await r.cmd("blockdev-add", cbw)
        await r.cmd(
            "blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}
        )
        await r.cmd("query-block-exports")
        note_locks(r, "disk.qcow2", "src.img", "tgt.img")

    ref, ours = await compare(tmp_path, scenario, setup=setup)
    assert_same(ref, ours)


async def test_export_refused_for_resize(tmp_path: Path) -> None:
    """An export never lets its node be resized: while another process holds resize of
    the file, even a read-only export is refused, after QEMU's two steps (attach sharing
    everything, then unshare resize), leaving no lock; once it is gone, it works."""

    async def scenario(r: Recorder) -> None:
        src = r.dir / "src.img"
        argv = [
            str(QSD),
            "--blockdev",
            f"driver=file,node-name=f,filename={src}",
            "--blockdev",
            "driver=blkdebug,node-name=d,image=f,take-child-perms.0=resize",
        ]
        sock = str(r.dir / "nbd.sock")
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        holder = await asyncio.to_thread(DaemonHolder, argv, src, {103})
        try:
            await r.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src"})
            await r.cmd("query-block-exports")
            note_locks(r, "src.img")
        finally:
            await asyncio.to_thread(holder.close)
        await r.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src"})
        note_locks(r, "src.img")

    ref, ours = await compare(tmp_path, scenario, setup=setup)
    assert_same(ref, ours)


def graph_edges(graph: dict[str, Any]) -> list[list[Any]]:
    """x-debug-query-block-graph's edges by the names of their ends, sorted."""
    names = {n["id"]: f"{n['type']}:{n['name']}" for n in graph["nodes"]}
    return sorted(
        [names[e["parent"]], names[e["child"]], e["name"], e["perm"], e["shared-perm"]]
        for e in graph["edges"]
    )


async def test_graph_shows_permissions(tmp_path: Path) -> None:
    """x-debug-query-block-graph shows what each parent takes and shares, as QEMU does:
    a qcow2 image and its export, then a backup's filter, source and target."""

    async def scenario(r: Recorder) -> None:
        sock = str(r.dir / "nbd.sock")
        await r.cmd("blockdev-add", qcow2("q", r.dir / "disk.qcow2"))
        await r.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await r.cmd(
            "block-export-add", {"type": "nbd", "id": "e0", "node-name": "q", "writable": True}
        )
        await r.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "src"})
        r.note(graph_edges(await r.cmd("x-debug-query-block-graph")))
        args = {"job-id": "j0", "device": "src", "target": "tgt", "sync": "none"}
        await r.cmd("blockdev-backup", {**args, "filter-node-name": "cbw"})
        r.note(graph_edges(await r.cmd("x-debug-query-block-graph")))
        await r.cmd("job-cancel", {"id": "j0"})
        await r.wait_status("j0", "null")

    ref, ours = await compare(tmp_path, scenario, setup=setup)
    for t in (ref, ours):
        t.replies = [e for e in t.replies if e[0] != "x-debug-query-block-graph"]
    assert_same(ref, ours)


async def compare_and_check(tmp_path: Path, scenario: Any) -> None:
    ref, ours = await compare(tmp_path, scenario, setup=setup)
    for t in (ref, ours):
        for entry in t.replies:
            if entry[0] == "query-named-block-nodes" and "return" in entry[1]:
                entry[1] = {"return": sorted(n["node-name"] for n in entry[1]["return"])}
    assert_same(ref, ours)
    assert any(r != [] and r != {"disk.qcow2": []} for r in ours.notes)  # the notes show locks
    for d in ("qsd", "ours"):
        assert not lock_bytes(tmp_path / d / "disk.qcow2")


async def test_daemon_start_refused(tmp_path: Path) -> None:
    """``--blockdev`` of an image another process writes: both daemons exit 1 at start,
    with QEMU's error and hint (ours on one line), and leave no lock behind."""
    assert QSD is not None
    setup(tmp_path)
    disk = tmp_path / "disk.qcow2"
    argv = ["--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={disk}"]
    with QemuIoHolder(disk, "qcow2"):
        before = lock_bytes(disk)
        ref, ours = [await tool(*cmd, *argv) for cmd in ([QSD], OURS)]
        assert lock_bytes(disk) == before
    hint = f"Is another process using the image [{disk}]?"
    lock_error = 'Failed to get "write" lock'
    assert ref == [1, f"qemu-storage-daemon: --blockdev {argv[1]}: {lock_error}\n{hint}\n"]
    assert ours == [1, f"blockbackup daemon: {lock_error}. {hint}\n"]


async def test_two_blockbackup_daemons(tmp_path: Path) -> None:
    """A second blockbackup daemon on a qcow2 image the first serves writable exits at
    start with QEMU's error on one line; once the first exits, the image is free."""
    setup(tmp_path)
    disk = tmp_path / "disk.qcow2"
    blockdev = f"driver=qcow2,node-name=q,file.driver=file,file.filename={disk}"
    first = await asyncio.create_subprocess_exec(
        *OURS,
        "--blockdev",
        blockdev,
        "--nbd-server",
        f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=q,writable=on",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_for_locks, disk, {100, 101, 103, 201, 203})
        second = await tool(*OURS, "--blockdev", blockdev)
        hint = f"Is another process using the image [{disk}]?"
        assert second == [1, f'blockbackup daemon: Failed to get "write" lock. {hint}\n']
        assert lock_bytes(disk) == {100, 101, 103, 201, 203}
    finally:
        first.terminate()
        assert await first.wait() == 0
    assert lock_bytes(disk) == set()
    assert (await tool("qemu-io", "-f", "qcow2", "-c", "write 0 4k", disk))[0] == 0
