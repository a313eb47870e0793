"""Image locking in one process: OFD locks belong to an open file, not to the process.

The cross-process behaviour (against qemu-storage-daemon, qemu-io, qemu-img) is in
``tests/compat/test_locking_scenarios.py``; here two graphs in one process, the
``locking`` option, blkdebug's permission options, a refused export, and that every
refusal and every close leaves no lock and no descriptor behind. What is held is read
from the kernel (``/proc/locks``), never from the code under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from blockbackup.block.graph import Graph
from blockbackup.block.permissions import ALL, ChildRole, Link, Perm, Use, child_use, perm_name
from blockbackup.block.qcow2.create import create_qcow2_file
from blockbackup.errors import BlockBackupError
from blockbackup.events import EventBus
from blockbackup.nbd.exports import ExportManager
from blockbackup.nbd.server import NbdServer
from testkit.images import make_image
from testkit.locks import lock_bytes

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OFD locks are Linux's"),
]
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")
MiB = 1 << 20
QCOW2_RW = {100, 101, 103, 201, 203}  # what qemu-storage-daemon 7.2 holds (compat tests)


@pytest_asyncio.fixture
async def graphs() -> AsyncIterator[list[Graph]]:
    made: list[Graph] = []
    try:
        yield made
    finally:
        for g in made:
            await g.aclose()


def new_graph(graphs: list[Graph]) -> Graph:
    g = Graph()
    graphs.append(g)
    return g


def qcow2_image(path: Path) -> Path:
    """A 1 MiB qcow2 image made with blockbackup's own creator (no QEMU needed)."""
    create_qcow2_file(path, MiB)
    return path


def qcow2(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    file: dict[str, Any] = {"driver": "file", "filename": str(path)}
    file.update(extra.pop("file", {}))
    return {"driver": "qcow2", "node-name": name, "file": file, **extra}


def qemu_io(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the model ---------------------------------------------------------------------------------


def test_qcow2_file_use() -> None:
    """qcow2 writes and resizes its file and shares neither, with or without users; read
    only, it only reads it and still shares neither (QEMU's bdrv_default_perms)."""
    meta = Link(ChildRole.DATA | ChildRole.METADATA | ChildRole.PRIMARY)
    nothing = Use()
    rw = child_use(meta, nothing, writable=True, in_use=False)
    shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    assert rw == Use(Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, shared)
    ro = child_use(meta, nothing, writable=False, in_use=False)
    assert ro == Use(Perm.CONSISTENT_READ, shared)


def test_raw_passes_through() -> None:
    """Raw over a whole file takes what its users take and shares what they share; a
    window (offset/size) also keeps its file from being resized."""
    export = Use(Perm.CONSISTENT_READ | Perm.WRITE, ALL & ~Perm.RESIZE)
    whole = Link(ChildRole.FILTERED | ChildRole.PRIMARY)
    assert child_use(whole, export, writable=True, in_use=True) == export
    assert child_use(whole, Use(), writable=True, in_use=False) == Use()
    window = Link(ChildRole.DATA | ChildRole.PRIMARY)
    assert child_use(window, Use(), writable=True, in_use=False) == Use(
        Perm.NONE, ALL & ~Perm.RESIZE
    )


def test_perm_names() -> None:
    assert perm_name(Perm.CONSISTENT_READ) == "consistent read"
    assert perm_name(Perm.WRITE | Perm.RESIZE) == "write, resize"


# -- one process, two opens --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_graphs_one_qcow2_image(tmp_path: Path, graphs: list[Graph]) -> None:
    """Two opens in one process conflict like two processes (OFD locks); the refused
    open leaves no node, descriptor or lock; once the first closes, the second opens."""
    disk = qcow2_image(tmp_path / "disk.qcow2")
    first, second = new_graph(graphs), new_graph(graphs)
    await first.add(qcow2("q", disk))
    assert lock_bytes(disk) == QCOW2_RW
    fds = open_fds()
    with pytest.raises(BlockBackupError) as info:
        await second.add(qcow2("q", disk))
    assert str(info.value) == 'Failed to get "write" lock'
    assert info.value.hint == f"Is another process using the image [{disk}]?"
    assert second.nodes == {}
    assert open_fds() == fds
    with pytest.raises(BlockBackupError, match=r'^Failed to get shared "write" lock$'):
        await second.add(qcow2("q", disk, **{"read-only": True}))
    assert lock_bytes(disk) == QCOW2_RW
    await first.delete("q")
    assert lock_bytes(disk) == set()
    node = await second.add(qcow2("q", disk))
    assert await node.read(0, 4096) == bytes(4096)
    await second.aclose()
    assert lock_bytes(disk) == set()


@pytest.mark.asyncio
async def test_read_only_opens_coexist(tmp_path: Path, graphs: list[Graph]) -> None:
    """Read-only opens of a qcow2 image coexist (each takes only consistent read), and
    with force-share they coexist with a writer too."""
    disk = qcow2_image(tmp_path / "disk.qcow2")
    a, b, c = new_graph(graphs), new_graph(graphs), new_graph(graphs)
    await a.add(qcow2("q", disk, **{"read-only": True}))
    await b.add(qcow2("q", disk, **{"read-only": True}))
    assert lock_bytes(disk) == {100, 201, 203}
    with pytest.raises(BlockBackupError, match=r'^Failed to get "write" lock$'):
        await c.add(qcow2("q", disk))
    await a.aclose()
    await b.aclose()
    await c.add(qcow2("q", disk))
    shared = await a.add(qcow2("q", disk, **{"read-only": True, "force-share": True}))
    assert await shared.read(0, 512) == bytes(512)


@pytest.mark.asyncio
@needs_qemu
async def test_locking_off(tmp_path: Path, graphs: list[Graph]) -> None:
    """``locking=off`` takes no lock at all (others are not kept out); ``on`` is ``auto``
    where OFD locks work; anything else is refused with QEMU's text."""
    disk = qcow2_image(tmp_path / "disk.qcow2")
    g = new_graph(graphs)
    await g.add(qcow2("off", disk, file={"locking": "off"}))
    assert lock_bytes(disk) == set()
    assert qemu_io("-f", "qcow2", "-c", "write 0 4k", disk).returncode == 0
    await g.delete("off")
    await g.add(qcow2("on", disk, file={"locking": "on"}))
    assert lock_bytes(disk) == QCOW2_RW
    with pytest.raises(
        BlockBackupError, match=r"^Parameter 'locking' does not accept value 'yes'$"
    ):
        await g.add(qcow2("bad", disk, file={"locking": "yes"}))


@pytest.mark.asyncio
@needs_qemu
async def test_blkdebug_child_perms(tmp_path: Path, graphs: list[Graph]) -> None:
    """blkdebug's take-child-perms / unshare-child-perms add to what it takes on its
    image, as in QEMU: here write is unshared, so qemu-io may not write the file."""
    path = make_image(tmp_path / "disk.raw", MiB)
    g = new_graph(graphs)
    await g.add(
        {
            "driver": "blkdebug",
            "node-name": "dbg",
            "image": {"driver": "file", "filename": str(path)},
            "take-child-perms": ["resize"],
            "unshare-child-perms": ["write"],
        }
    )
    assert lock_bytes(path) == {103, 201}
    res = qemu_io("-f", "raw", "-c", "write 0 4k", path)
    assert res.returncode == 1
    assert 'Failed to get "write" lock\nIs another process using the image' in res.stderr
    assert qemu_io("-r", "-f", "raw", "-c", "read 0 4k", path).returncode == 0
    await g.delete("dbg")
    assert lock_bytes(path) == set()


@pytest.mark.asyncio
async def test_writable_export_refused(tmp_path: Path, graphs: list[Graph]) -> None:
    """A writable export of a file whose writing someone else forbids is refused with
    QEMU's error and is not created; a read-only export of it is fine."""
    path = make_image(tmp_path / "disk.raw", MiB)
    blocker = new_graph(graphs)
    file = {"driver": "file", "filename": str(path)}
    await blocker.add(
        {"driver": "blkdebug", "node-name": "b", "image": file, "unshare-child-perms": ["write"]}
    )
    g = new_graph(graphs)
    await g.add({"driver": "raw", "node-name": "disk", "file": file})
    exports = ExportManager(g, EventBus())
    server = NbdServer(exports)
    await server.start({"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}})
    try:
        with pytest.raises(BlockBackupError, match=r'^Failed to get "write" lock$'):
            exports.add("e0", "disk", writable=True)
        assert exports.query() == []
        assert g.nodes["disk"].users == {}
        exports.add("e1", "disk")
        assert lock_bytes(path) == {100, 201, 203}  # ours: read, no resize; theirs: write
    finally:
        await server.stop()
    await blocker.aclose()
    await g.aclose()
    assert lock_bytes(path) == set()


@pytest.mark.asyncio
async def test_two_qcow2_nodes_on_one_file_node(tmp_path: Path, graphs: list[Graph]) -> None:
    """Two formats writing one file node share its one open file, so no lock can object:
    the graph refuses the second with QEMU's permission conflict, and a read-only one too
    (it would not share the first one's writes)."""
    disk = qcow2_image(tmp_path / "disk.qcow2")
    g = new_graph(graphs)
    await g.add({"driver": "file", "node-name": "f", "filename": str(disk)})
    await g.add({"driver": "qcow2", "node-name": "q1", "file": "f"})
    for extra in ({}, {"read-only": True}):
        with pytest.raises(BlockBackupError) as info:
            await g.add({"driver": "qcow2", "node-name": "q2", "file": "f", **extra})
        assert str(info.value) == (
            "Permission conflict on node 'f': permissions 'write, resize' are both required "
            "by node 'q1' (uses node 'f' as 'file' child) and unshared by node 'q2' (uses "
            "node 'f' as 'file' child)."
        )
        assert set(g.nodes) == {"f", "q1"}
        assert g.nodes["f"].parents == [g.nodes["q1"]]
    await g.delete("q1")
    await g.add({"driver": "qcow2", "node-name": "q2", "file": "f", "read-only": True})
    await g.add({"driver": "qcow2", "node-name": "q3", "file": "f", "read-only": True})
    assert lock_bytes(disk) == {100, 201, 203}
