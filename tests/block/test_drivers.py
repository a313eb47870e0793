"""The block drivers and the request layer: conformance of every driver, then the specific
behaviour of file, raw, Graph.add/delete, quiesce, before-write hooks and blkdebug."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from block.driver_conformance import check_block_driver
from blockbackup.block.driver import Status, WriteFlags
from blockbackup.block.drivers.blkdebug import BlkdebugDriver, IOType
from blockbackup.block.graph import CloseError, Graph
from blockbackup.block.node import BlockNode
from blockbackup.block.qcow2.create import create_qcow2_file
from blockbackup.errors import BlockBackupError
from testkit.images import cached_bytes, page_cache_drops

MiB = 1 << 20


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _file_opts(path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path), **extra}


def _o_direct_supported(directory: Path) -> bool:
    probe = _sparse(directory / "odirect-probe", 4096)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


# -- conformance ----------------------------------------------------------------------------


async def _file_factory(
    graph: Graph, *, name: str, directory: Path, size: int, read_only: bool, **extra: Any
) -> BlockNode:
    path = _sparse(directory / "disk.img", size)
    return await graph.add({**_file_opts(path, **extra), "node-name": name, "read-only": read_only})


@pytest.mark.asyncio
async def test_conformance_file(tmp_path: Path) -> None:
    await check_block_driver(_file_factory, tmp_path)


@pytest.mark.asyncio
async def test_conformance_file_discard_unmap(tmp_path: Path) -> None:
    async def factory(graph: Graph, **kw: Any) -> BlockNode:
        return await _file_factory(graph, discard="unmap", **kw)

    await check_block_driver(factory, tmp_path, seed=1)


@pytest.mark.asyncio
async def test_conformance_file_direct(tmp_path: Path) -> None:
    if not _o_direct_supported(tmp_path):
        pytest.skip("O_DIRECT is not supported on the temporary directory's filesystem")

    async def factory(graph: Graph, **kw: Any) -> BlockNode:
        node = await _file_factory(graph, cache={"direct": True}, **kw)
        assert node.limits.request_alignment == 4096
        return node

    await check_block_driver(factory, tmp_path, seed=2)


@pytest.mark.asyncio
async def test_conformance_raw_over_file(tmp_path: Path) -> None:
    async def factory(
        graph: Graph, *, name: str, directory: Path, size: int, read_only: bool
    ) -> BlockNode:
        path = _sparse(directory / "disk.img", size)
        opts = {
            "driver": "raw",
            "node-name": name,
            "read-only": read_only,
            "file": _file_opts(path),
        }
        return await graph.add(opts)

    await check_block_driver(factory, tmp_path, seed=3)


@pytest.mark.asyncio
async def test_conformance_raw_window(tmp_path: Path) -> None:
    """A raw window in the middle of a bigger file; the bytes around it are never touched."""
    guard = b"\xa5" * 65536
    paths: list[Path] = []

    async def factory(
        graph: Graph, *, name: str, directory: Path, size: int, read_only: bool
    ) -> BlockNode:
        path = directory / "disk.img"
        path.write_bytes(guard + bytes(size) + guard)
        paths.append(path)
        opts = {
            "driver": "raw",
            "node-name": name,
            "read-only": read_only,
            "offset": len(guard),
            "size": size,
            "file": _file_opts(path),
        }
        return await graph.add(opts)

    await check_block_driver(factory, tmp_path, seed=4)
    for path in paths:
        data = path.read_bytes()
        assert data[: len(guard)] == guard
        assert data[-len(guard) :] == guard


@pytest.mark.asyncio
async def test_conformance_null(tmp_path: Path) -> None:
    """null-co drops writes, so data is not compared (``stores_data=False``); requests must
    still succeed, return the right lengths, tile block status and fail as they must."""

    async def factory(
        graph: Graph, *, name: str, directory: Path, size: int, read_only: bool
    ) -> BlockNode:
        opts = {"driver": "null-co", "node-name": name, "size": size, "read-only": read_only}
        return await graph.add({**opts, "read-zeroes": True})

    await check_block_driver(factory, tmp_path, stores_data=False)


async def _blkdebug_factory(
    graph: Graph, *, name: str, directory: Path, size: int, read_only: bool, **extra: Any
) -> BlockNode:
    path = _sparse(directory / "disk.img", size)
    opts = {
        "driver": "blkdebug",
        "node-name": name,
        "read-only": read_only,
        "image": _file_opts(path),
    }
    node = await graph.add({**opts, **extra})
    assert isinstance(node.driver, BlkdebugDriver)
    return node


@pytest.mark.asyncio
async def test_conformance_blkdebug(tmp_path: Path) -> None:
    await check_block_driver(_blkdebug_factory, tmp_path, seed=5)


@pytest.mark.asyncio
async def test_conformance_blkdebug_align_4096(tmp_path: Path) -> None:
    """align=4096 makes the request layer pad every unaligned request (read-modify-write)."""

    async def factory(graph: Graph, **kw: Any) -> BlockNode:
        node = await _blkdebug_factory(graph, align=4096, **kw)
        assert node.limits.request_alignment == 4096
        return node

    await check_block_driver(factory, tmp_path, seed=6)


@pytest.mark.asyncio
async def test_conformance_blkdebug_max_transfer(tmp_path: Path) -> None:
    async def factory(graph: Graph, **kw: Any) -> BlockNode:
        extra: dict[str, Any] = {"align": 512, "max-transfer": 65536}
        node = await _blkdebug_factory(graph, **extra, **kw)
        assert node.limits.max_transfer == 65536
        return node

    await check_block_driver(factory, tmp_path, seed=7)


@pytest.mark.asyncio
async def test_blkdebug_aligned_requests_reach_driver(tmp_path: Path) -> None:
    """With align=4096 and max-transfer, the driver only ever sees aligned, split requests."""
    graph = Graph()
    try:
        path = _sparse(tmp_path / "d.img", 1 * MiB)
        node = await graph.add(
            {
                "driver": "blkdebug",
                "node-name": "d",
                "align": 4096,
                "max-transfer": 8192,
                "image": _file_opts(path),
            }
        )
        drv = node.driver
        assert isinstance(drv, BlkdebugDriver)
        seen: list[tuple[int, int]] = []
        orig_read, orig_write = drv.child.read, drv.child.write

        async def read(offset: int, length: int) -> Any:
            seen.append((offset, length))
            return await orig_read(offset, length)

        async def write(offset: int, data: Any, flags: WriteFlags = WriteFlags.NONE) -> None:
            seen.append((offset, len(data)))
            await orig_write(offset, data, flags)

        drv.child.read = read  # type: ignore[method-assign]
        drv.child.write = write  # type: ignore[method-assign]
        await node.write(100, b"z" * 20000)
        assert bytes(await node.read(99, 20002)) == b"\0" + b"z" * 20000 + b"\0"
        assert seen
        for offset, length in seen:
            assert offset % 4096 == 0
            assert length % 4096 == 0
            assert length <= 8192
    finally:
        await graph.aclose()


# -- file specifics ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_file_block_status_data_and_holes(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "sparse.img", 16 * MiB)
    graph = Graph()
    try:
        node = await graph.add({**_file_opts(path), "node-name": "f"})
        await node.write(1 * MiB, b"\x5a" * (64 * 1024))
        await node.flush()
        extents = []
        pos = 0
        while pos < node.size:
            ext = await node.block_status(pos, node.size - pos)
            extents.append(ext)
            pos = ext.end
        kinds = [(e.offset, e.end, bool(e.status & Status.DATA)) for e in extents]
        assert len(kinds) == 3, kinds
        (h1s, h1e, h1d), (ds, de, dd), (h2s, h2e, h2d) = kinds
        assert (h1s, h1d) == (0, False)
        assert extents[0].status & Status.ZERO
        assert dd
        assert ds <= 1 * MiB
        assert de >= 1 * MiB + 64 * 1024
        assert (h2e, h2d) == (16 * MiB, False)
        assert extents[2].status & Status.ZERO
        assert h1e == ds
        assert de == h2s
        assert all(e.status & Status.ALLOCATED for e in extents)
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_file_write_zeroes_unmap_keeps_sparse(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    with open(path, "wb") as f:
        f.write(b"\x11" * (8 * MiB))
        f.flush()
        os.fsync(f.fileno())
    full = os.stat(path).st_blocks
    graph = Graph()
    try:
        node = await graph.add({**_file_opts(path), "node-name": "f"})
        await node.write_zeroes(0, 8 * MiB, WriteFlags.MAY_UNMAP)
        await node.flush()
        assert bytes(await node.read(0, 8 * MiB)) == bytes(8 * MiB)
        assert os.stat(path).st_blocks < full // 8, (os.stat(path).st_blocks, full)
        ext = await node.block_status(0, 8 * MiB)
        assert ext.status & Status.ZERO
        assert ext.length == 8 * MiB
        assert os.stat(path).st_size == 8 * MiB
    finally:
        await graph.aclose()


# -- Graph.add / Graph.delete -----------------------------------------------------------------


async def _add_error(graph: Graph, opts: dict[str, Any]) -> str:
    with pytest.raises(BlockBackupError) as info:
        await graph.add(opts)
    return str(info.value)


@pytest.mark.asyncio
async def test_graph_add_errors_match_qemu(tmp_path: Path) -> None:
    img = _sparse(tmp_path / "a.img", 1 * MiB)
    graph = Graph()
    try:
        await graph.add({**_file_opts(img), "node-name": "f"})
        cases: list[tuple[dict[str, Any], str]] = [
            ({**_file_opts(img), "node-name": "f"}, "Duplicate nodes with node-name='f'"),
            (_file_opts(img), "'node-name' must be specified for the root node"),
            (
                {"driver": "nosuch", "node-name": "x"},
                "Parameter 'driver' does not accept value 'nosuch'",
            ),
            ({**_file_opts(img), "node-name": "1x"}, "Invalid node-name: '1x'"),
            (
                {"driver": "file", "node-name": "m", "filename": "/x/nonexist.img"},
                "Could not open '/x/nonexist.img': No such file or directory",
            ),
            ({**_file_opts(img), "node-name": "u", "bogus": 1}, "Parameter 'bogus' is unexpected"),
            (
                {"driver": "raw", "node-name": "r", "file": {**_file_opts(img), "bogus": 1}},
                "Parameter 'file.bogus' is unexpected",
            ),
            (
                {"driver": "null-co", "node-name": "n", "size": "big"},
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                {"driver": "raw", "node-name": "w", "offset": 1000000, "size": 100000, "file": "f"},
                "The sum of offset (1000000) and size (100000) has to be smaller or equal to the "
                " actual size of the containing file (1048576)",
            ),
        ]
        for opts, text in cases:
            assert await _add_error(graph, opts) == text, opts
        assert set(graph.nodes) == {"f"}
        assert graph.nodes["f"].parents == []
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_graph_delete_errors_and_implicit_children(tmp_path: Path) -> None:
    img = _sparse(tmp_path / "a.img", 1 * MiB)
    graph = Graph()
    try:
        with pytest.raises(
            BlockBackupError, match=r"^Failed to find node with node-name='nosuch'$"
        ):
            await graph.delete("nosuch")
        f = await graph.add({**_file_opts(img), "node-name": "f"})
        await graph.add({"driver": "raw", "node-name": "r", "file": "f"})
        with pytest.raises(BlockBackupError, match=r"^Block device f is in use$"):
            await graph.delete("f")
        await graph.delete("r")
        assert f.parents == []
        await graph.delete("f")
        assert graph.nodes == {}

        # Implicit (nested) children go with their parent.
        top = await graph.add({"driver": "raw", "node-name": "top", "file": _file_opts(img)})
        (child,) = top.children.values()
        assert child.implicit
        assert child.name in graph.nodes
        await graph.delete("top")
        assert graph.nodes == {}
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_failed_add_leaves_no_half_made_nodes(tmp_path: Path) -> None:
    img = _sparse(tmp_path / "a.img", 1 * MiB)
    graph = Graph()
    try:
        bad: list[dict[str, Any]] = [
            # the nested child opens, then the parent fails on its own option
            {"driver": "raw", "node-name": "r", "offset": 4 * MiB, "file": _file_opts(img)},
            {"driver": "raw", "node-name": "r", "bogus": True, "file": _file_opts(img)},
            # the nested child itself fails
            {
                "driver": "raw",
                "node-name": "r",
                "file": {**_file_opts(img), "node-name": "c", "x": 1},
            },
            {"driver": "blkdebug", "node-name": "d", "align": 3, "image": _file_opts(img)},
            {
                "driver": "blkdebug",
                "node-name": "d",
                "image": _file_opts(img),
                "inject-error": [{"event": "x"}],
            },
        ]
        for opts in bad:
            with pytest.raises(BlockBackupError):
                await graph.add(opts)
            assert graph.nodes == {}, opts
        # The names are free again.
        await graph.add(
            {"driver": "raw", "node-name": "r", "file": {**_file_opts(img), "node-name": "c"}}
        )
        assert set(graph.nodes) == {"r", "c"}
    finally:
        await graph.aclose()


# -- quiesce and before-write hooks -----------------------------------------------------------


async def _blkdebug_node(
    graph: Graph, tmp_path: Path, size: int = 1 * MiB, **extra: Any
) -> tuple[BlockNode, BlkdebugDriver]:
    img = _sparse(tmp_path / "bd.img", size)
    node = await graph.add(
        {"driver": "blkdebug", "node-name": "d", "image": _file_opts(img), **extra}
    )
    assert isinstance(node.driver, BlkdebugDriver)
    return node, node.driver


@pytest.mark.asyncio
async def test_write_while_quiesced_waits(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        async with asyncio.TaskGroup() as tg:
            async with node.quiesced():
                task = tg.create_task(node.write(0, b"late"))
                # Reads are served while quiesced; run the loop until the write is parked.
                assert bytes(await node.read(0, 4)) == b"\0" * 4
                for _ in range(10):
                    await asyncio.sleep(0)
                assert not task.done()
                assert drv.counts[IOType.WRITE] == 0
            await task
        assert bytes(await node.read(0, 4)) == b"late"
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_quiesced_waits_for_in_flight_writes(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        bp = drv.add_breakpoint("write")
        entered = asyncio.Event()
        order: list[str] = []

        async def quiesce() -> None:
            async with node.quiesced():
                entered.set()
                order.append("quiesced")

        async def write() -> None:
            await node.write(4096, b"in flight")
            order.append("written")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(write())
            await bp.arrived.wait()  # the write is inside the driver, held
            q = tg.create_task(quiesce())
            for _ in range(10):
                await asyncio.sleep(0)
            assert not entered.is_set(), "quiesced() returned with a write in flight"
            bp.resume()
            await q
        assert order == ["written", "quiesced"]
        assert bytes(await node.read(4096, 9)) == b"in flight"
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_before_write_hook_runs_first_and_can_fail(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        await node.write(0, b"old data")
        calls: list[tuple[int, int, int]] = []

        async def hook(offset: int, length: int) -> None:
            # The driver has not seen the write yet, and the old data is still there.
            calls.append((offset, length, drv.counts[IOType.WRITE]))
            assert bytes(await node.read(offset, length)) == b"old data"[:length]

        node.add_before_write(hook)
        before = drv.counts[IOType.WRITE]
        await node.write(0, b"new data")
        assert calls == [(0, 8, before)]
        assert bytes(await node.read(0, 8)) == b"new data"
        node.remove_before_write(hook)

        async def failing(offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        node.add_before_write(failing)
        writes = drv.counts[IOType.WRITE]
        for op in (node.write(0, b"XXXXXXXX"), node.write_zeroes(0, 8), node.discard(0, 8)):
            await _expect_errno(errno.ENOSPC, op)
        assert drv.counts[IOType.WRITE] == writes
        assert drv.counts[IOType.WRITE_ZEROES] == 0
        assert drv.counts[IOType.DISCARD] == 0
        assert bytes(await node.read(0, 8)) == b"new data"
        assert node.in_flight == 0
    finally:
        await graph.aclose()


# -- blkdebug ---------------------------------------------------------------------------------


async def _expect_errno(code: int, aw: Any) -> None:
    with pytest.raises(OSError, match=re.escape(os.strerror(code))) as info:
        await aw
    assert info.value.errno == code, info.value


@pytest.mark.asyncio
async def test_blkdebug_rule_once_vs_always(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        once = drv.add_rule("write", errno.ENOSPC, once=True)
        await _expect_errno(errno.ENOSPC, node.write(0, b"a"))
        assert once.hits == 1
        assert once not in drv.rules
        await node.write(0, b"a")
        always = drv.add_rule("read")
        for _ in range(3):
            await _expect_errno(errno.EIO, node.read(0, 1))
        assert always.hits == 3
        drv.remove_rule(always)
        assert bytes(await node.read(0, 1)) == b"a"
        drv.remove_rule(always)  # removing twice is harmless
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_blkdebug_each_op(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path, discard="unmap")
        await node.write(0, b"\x77" * 8192)
        calls: dict[IOType, Callable[[], Awaitable[object]]] = {
            IOType.READ: lambda: node.read(0, 4096),
            IOType.WRITE: lambda: node.write(0, b"x" * 4096),
            IOType.WRITE_ZEROES: lambda: node.write_zeroes(0, 4096),
            IOType.DISCARD: lambda: node.discard(0, 4096),
            IOType.FLUSH: lambda: node.flush(),
            IOType.BLOCK_STATUS: lambda: node.block_status(0, 4096),
        }
        for op, call in calls.items():
            rule = drv.add_rule(op, errno.EROFS)
            await _expect_errno(errno.EROFS, call())
            # Only that op fails.
            for other, other_call in calls.items():
                if other not in (op, IOType.WRITE, IOType.WRITE_ZEROES, IOType.DISCARD):
                    await other_call()
            drv.remove_rule(rule)
            await call()
        # A failed write-zeroes/discard/write left the data alone.
        drv.add_rule(["write", "write_zeroes", "discard"])
        await _expect_errno(errno.EIO, node.write(4096, b"y" * 10))
        await _expect_errno(errno.EIO, node.write_zeroes(4096, 4096))
        await _expect_errno(errno.EIO, node.discard(4096, 4096))
        assert bytes(await node.read(4096, 4096)) == b"\x77" * 4096
        drv.clear_rules()
        assert drv.rules == []
        assert drv.counts[IOType.FLUSH] >= 2
        assert drv.counts[IOType.BLOCK_STATUS] >= 2
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_blkdebug_offset_pinned_rules(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        drv.add_rule("read", offset=65536, length=4096)
        await node.read(0, 65536)  # ends right before
        await node.read(65536 + 4096, 4096)  # starts right after
        await _expect_errno(errno.EIO, node.read(65536 + 4095, 1))
        await _expect_errno(errno.EIO, node.read(60000, 10000))
        # Flushes have no range: a pinned rule never fails them.
        drv.add_rule("flush", offset=0, length=MiB)
        await node.flush()
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_blkdebug_rules_added_while_requests_run(tmp_path: Path) -> None:
    """A rule added at run time applies to the next request that reaches the driver,
    including one already held in flight."""
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        bp = drv.add_breakpoint("read")
        task = asyncio.create_task(node.read(0, 512))
        await bp.arrived.wait()
        rule = drv.add_rule("read", errno.ENOMEM)
        drv.remove_breakpoint(bp)
        await _expect_errno(errno.ENOMEM, task)
        drv.remove_rule(rule)
        await node.read(0, 512)
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_blkdebug_qemu_options(tmp_path: Path) -> None:
    img = _sparse(tmp_path / "q.img", 1 * MiB)
    graph = Graph()
    try:
        node = await graph.add(
            {
                "driver": "blkdebug",
                "node-name": "d",
                "image": _file_opts(img),
                "inject-error": [
                    {
                        "event": "write_aio",
                        "errno": 28,
                        "sector": 8,
                        "once": True,
                        "immediately": False,
                    },
                    {"event": "read_aio", "errno": 5, "state": 1},
                    {"event": "flush_to_disk", "errno": 30},
                    {"event": "pwritev_zero", "errno": 95},
                    {"event": "l2_load"},  # a qcow2 event: parses, never fires here
                    {"event": "none", "iotype": "discard", "errno": 1},
                ],
                "set-state": [{"event": "l1_update", "state": 1, "new_state": 2}],
                "take-child-perms": ["write"],
                "unshare-child-perms": ["resize"],
            }
        )
        drv = node.driver
        assert isinstance(drv, BlkdebugDriver)
        assert [(r.event, r.errno) for r in drv.rules] == [
            ("write_aio", 28),
            ("read_aio", 5),
            ("flush_to_disk", 30),
            ("pwritev_zero", 95),
            ("l2_load", 5),
            ("none", 1),
        ]
        # write_aio, sector 8 (byte 4096), once; write_aio never fails write-zeroes.
        await node.write(0, b"x" * 4096)
        await _expect_errno(errno.ENOSPC, node.write(4000, b"x" * 100))
        await node.write(4000, b"x" * 100)
        await _expect_errno(errno.EIO, node.read(0, 1))
        await _expect_errno(errno.EROFS, node.flush())
        await _expect_errno(errno.EOPNOTSUPP, node.write_zeroes(0, 4096))
        await _expect_errno(errno.EPERM, node.discard(0, 4096))
        await node.block_status(0, 4096)
        with pytest.raises(CloseError, match=r"^Failed to flush 'd' \(Read-only file system\)"):
            await graph.aclose()  # the flush rule still fires: the final flush is reported
    finally:
        await graph.aclose()


def _open_paths() -> set[str]:
    """The files this process holds open (its file descriptors' targets)."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


@pytest.mark.asyncio
async def test_close_goes_on_past_a_driver_whose_close_fails(tmp_path: Path) -> None:
    """qcow2 writes its metadata back at close, through a blkdebug that fails every flush:
    its close raises. The graph's close still closes every node (the qcow2's implicit
    children and an unrelated node after it), releases every file, and reports each
    failure in one CloseError."""
    img = tmp_path / "a.qcow2"
    create_qcow2_file(img, 4 * MiB)
    other_img = _sparse(tmp_path / "other.img", MiB)
    graph = Graph()
    flaky = {"event": "flush_to_disk", "errno": errno.EIO}
    node = await graph.add(
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": {"driver": "blkdebug", "image": _file_opts(img), "inject-error": [flaky]},
        }
    )
    await graph.add({"node-name": "other", **_file_opts(other_img)})
    await node.write(0, b"x" * 65536)
    assert {str(img), str(other_img)} <= _open_paths()
    with pytest.raises(CloseError) as info:
        await graph.aclose()
    assert str(info.value) == (
        "Failed to flush 'q' (Input/output error); "
        "Failed to close 'q' (Input/output error) at close"
    )
    assert graph.nodes == {}
    assert not {str(img), str(other_img)} & _open_paths()


@pytest.mark.asyncio
async def test_blkdebug_iotype_and_state(tmp_path: Path) -> None:
    img = _sparse(tmp_path / "s.img", 1 * MiB)
    graph = Graph()
    try:
        node = await graph.add(
            {
                "driver": "blkdebug",
                "node-name": "d",
                "image": _file_opts(img),
                "inject-error": [
                    {"event": "none", "iotype": ["write", "write-zeroes"]},
                    {"event": "read_aio", "state": 2, "errno": 28},
                ],
                "set-state": [{"event": "flush_to_disk", "new_state": 2}],
            }
        )
        await _expect_errno(errno.EIO, node.write(0, b"x"))
        await _expect_errno(errno.EIO, node.write_zeroes(0, 512))
        await node.read(0, 512)  # state 1: the read rule waits for state 2
        await node.flush()  # switches to state 2
        await _expect_errno(errno.ENOSPC, node.read(0, 512))
    finally:
        await graph.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ({"inject-error": [{"event": "bogus"}]}, "Parameter 'event' does not accept value 'bogus'"),
        (
            {"inject-error": [{"event": "read_aio", "iotype": "bogus"}]},
            "Parameter 'iotype' does not accept value 'bogus'",
        ),
        (
            {"inject-error": [{"event": "read_aio", "errno": "x"}]},
            "Invalid parameter type for 'inject-error[0].errno', expected: integer",
        ),
        (
            {"inject-error": [{"event": "read_aio", "once": "maybe"}]},
            "Invalid parameter type for 'inject-error[0].once', expected: boolean",
        ),
        (
            {"inject-error": [{"event": "read_aio", "bogus": 1}]},
            "Parameter 'inject-error[0].bogus' is unexpected",
        ),
        ({"inject-error": [{"errno": 5}]}, "Parameter 'inject-error[0].event' is missing"),
        (
            {"inject-error": {"event": "read_aio"}},
            "Invalid parameter type for 'inject-error', expected: array",
        ),
        ({"set-state": [{"event": "read_aio"}]}, "Parameter 'set-state[0].new_state' is missing"),
        ({"align": 3}, "Cannot meet constraints with align 3"),
        ({"align": 512, "max-transfer": 1000}, "Cannot meet constraints with max-transfer 1000"),
        (
            {"take-child-perms": ["fly"]},
            "Parameter 'take-child-perms[0]' does not accept value 'fly'",
        ),
    ],
)
async def test_blkdebug_option_errors(tmp_path: Path, extra: dict[str, Any], text: str) -> None:
    img = _sparse(tmp_path / "e.img", 1 * MiB)
    graph = Graph()
    try:
        opts = {"driver": "blkdebug", "node-name": "d", "image": _file_opts(img), **extra}
        assert await _add_error(graph, opts) == text
        assert graph.nodes == {}
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_blkdebug_config_refused(tmp_path: Path) -> None:
    img = _sparse(tmp_path / "c.img", 1 * MiB)
    graph = Graph()
    try:
        text = await _add_error(
            graph,
            {
                "driver": "blkdebug",
                "node-name": "d",
                "config": "/etc/x.conf",
                "image": _file_opts(img),
            },
        )
        assert "'config'" in text
        assert "not supported" in text
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_blkdebug_is_a_filter_without_fd_map(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        assert drv.is_filter
        assert list(node.children) == ["image"]
        assert node.fd_map(0) is None
        assert drv.child.fd_map(0) is not None  # the file below could, blkdebug hides it
        # Copy offload refuses, so it falls back to read + write through the rules.
        await _expect_errno(errno.ENOTSUP, node.copy_range_from(drv.child, 0, 0, 4096))
        await node.write(0, b"data")
        ext = await node.block_status(0, node.size)
        assert ext.offset == 0
        assert ext.status & Status.DATA
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_blkdebug_counts(tmp_path: Path) -> None:
    graph = Graph()
    try:
        node, drv = await _blkdebug_node(graph, tmp_path)
        drv.add_rule("write", once=True)
        await _expect_errno(errno.EIO, node.write(0, b"x"))
        await node.write(0, b"x")
        await node.read(0, 1)
        await node.flush()
        assert drv.counts[IOType.WRITE] == 2  # failed requests are counted too
        assert drv.counts[IOType.READ] == 1
        assert drv.counts[IOType.FLUSH] == 1
    finally:
        await graph.aclose()


# -- interop ---------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_qemu_img_compare(tmp_path: Path) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed")
    size = 8 * MiB
    ours = _sparse(tmp_path / "ours.img", size)
    reference = bytearray(size)
    graph = Graph()
    try:
        node = await graph.add({"driver": "raw", "node-name": "r", "file": _file_opts(ours)})
        rng = random.Random(42)
        for _ in range(40):
            offset = rng.randrange(size - 70000)
            data = rng.randbytes(rng.randint(1, 70000))
            await node.write(offset, data)
            reference[offset : offset + len(data)] = data
        await node.write_zeroes(1 * MiB, 256 * 1024, WriteFlags.MAY_UNMAP)
        reference[1 * MiB : 1 * MiB + 256 * 1024] = bytes(256 * 1024)
        await node.flush()
    finally:
        await graph.aclose()
    ref = tmp_path / "reference.img"
    ref.write_bytes(reference)
    proc = await asyncio.create_subprocess_exec(
        qemu_img,
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        str(ours),
        str(ref),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()


@pytest.mark.asyncio
async def test_file_inline_write_backoff(tmp_path: Path) -> None:
    """A slow inline write sends the file's writes to the pool for a while, longer each time
    in a row, and back to the shortest period once the last stall is long past; writes stay
    correct throughout."""
    from blockbackup.block.drivers import file as file_mod

    path = _sparse(tmp_path / "disk.img", 4 * MiB)
    graph = Graph()
    try:
        node = await graph.add({**_file_opts(path), "node-name": "f"})
        drv = node.driver
        assert isinstance(drv, file_mod.FileDriver)
        backoff = drv._write_backoff
        now = time.monotonic()
        backoff.stalled(now)
        assert backoff.after == now + file_mod.INLINE_BACKOFF_MIN
        backoff.stalled(now + 0.1)  # again within the period: the next one lasts twice as long
        assert backoff.after == now + 0.1 + 2 * file_mod.INLINE_BACKOFF_MIN
        for _ in range(20):  # capped
            backoff.stalled(backoff.after)
        assert backoff.period == file_mod.INLINE_BACKOFF_MAX
        later = backoff.after + file_mod.INLINE_BACKOFF_MAX + 1
        backoff.stalled(later)  # long after the last stall: back to the shortest period
        assert backoff.after == later + file_mod.INLINE_BACKOFF_MIN
        # Writes now go through the pool (the back-off is in the future) and land.
        assert backoff.after > time.monotonic()
        await node.write(4096, b"\x77" * 4096)
        await node.flush()
        assert path.read_bytes()[4096:8192] == b"\x77" * 4096
        # The threshold stays above the interpreter's GIL switch interval (see the driver).
        assert 2 * sys.getswitchinterval() < file_mod.INLINE_SLOW
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_file_block_status_inline_then_pool_after_a_slow_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block status runs on the loop thread; one slow call (an extent tree read from disk)
    sends the file's calls to the pool for the back-off period, with the same answers."""
    from blockbackup.block.drivers import file as file_mod

    path = _sparse(tmp_path / "disk.img", 4 * MiB)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(64 * 1024))
    graph = Graph()
    try:
        node = await graph.add({**_file_opts(path), "node-name": "f"})
        drv = node.driver
        assert isinstance(drv, file_mod.FileDriver)
        pooled: list[object] = []
        real_pool = file_mod.run_blocking

        async def counting(fn: Any, *args: Any) -> Any:
            pooled.append(fn)
            return await real_pool(fn, *args)

        monkeypatch.setattr(file_mod, "run_blocking", counting)
        hole = await node.block_status(0, 4 * MiB)
        assert (hole.length, hole.status & Status.ZERO) == (MiB, Status.ZERO)
        assert pooled == []  # inline
        real_seek = file_mod._seek_extent

        def slow_seek(fd: int, offset: int, length: int) -> tuple[int, bool]:
            time.sleep(2 * file_mod.INLINE_STATUS_SLOW)
            return real_seek(fd, offset, length)

        monkeypatch.setattr(file_mod, "_seek_extent", slow_seek)
        data = await node.block_status(MiB, 3 * MiB)
        assert (data.length, data.status & Status.DATA) == (64 * 1024, Status.DATA)
        assert pooled == []
        assert drv._status_backoff.after > time.monotonic()  # backing off now
        assert drv._write_backoff.after == 0.0  # writes are not affected
        again = await node.block_status(MiB, 3 * MiB)
        assert pooled == [slow_seek]
        assert (again.length, again.status) == (data.length, data.status)
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_read_now_only_for_plain_cached_reads(tmp_path: Path) -> None:
    """``read_now`` answers what ``read`` would, or None having done nothing: outside
    the node, while quiesced, beyond the inline limit, with O_DIRECT."""
    graph = Graph()
    try:
        data = os.urandom(4 * MiB)
        path = tmp_path / "d.img"
        path.write_bytes(data)
        node = await graph.add({**_file_opts(path), "node-name": "f"})
        raw = await graph.add({"driver": "raw", "node-name": "r", "file": "f", "offset": 4097})
        assert node.read_now(MiB - 5, MiB) == data[MiB - 5 : 2 * MiB - 5]
        assert raw.read_now(0, 4096) == data[4097 : 4097 + 4096]
        assert raw.read_now(raw.size - 7, 7) == data[-7:]
        assert raw.read_now(raw.size - 7, 8) is None  # outside: read() raises EINVAL
        assert node.read_now(0, 0) is None
        assert node.read_now(0, 2 * MiB) is None  # above INLINE_READ_MAX: the pool
        async with node.quiesced():
            assert node.read_now(0, 4096) is None
        if _o_direct_supported(tmp_path):
            direct = await graph.add(
                {**_file_opts(path), "node-name": "d", "cache": {"direct": True}, "read-only": True}
            )
            assert direct.read_now(0, 4096) is None
    finally:
        await graph.aclose()


@pytest.mark.asyncio
async def test_drop_cache_evicts_only_where_it_may(tmp_path: Path) -> None:
    """``drop_cache`` evicts a file's written-back pages, only in the node's range (raw
    ``offset``), through blkdebug; a ``no-flush`` node keeps them (evicting means writing
    back, which it was told to spare), and says early writeback does not suit it, as
    O_DIRECT and null nodes do. Out of range is refused like any request.

    The kernel evicts whole folios (up to 2 MiB here), so ranges are 2 MiB-aligned.
    """
    if not page_cache_drops(tmp_path):
        pytest.skip("this file system never evicts its pages (tmpfs)")
    graph = Graph()
    try:
        path = tmp_path / "d.img"
        path.write_bytes(os.urandom(16 * MiB))
        await graph.add({**_file_opts(path), "node-name": "f"})
        window = await graph.add(
            {"driver": "raw", "node-name": "w", "file": "f", "offset": 4 * MiB, "size": 8 * MiB}
        )
        debug = await graph.add({"driver": "blkdebug", "node-name": "dbg", "image": "w"})
        assert debug.early_writeback()
        assert window.early_writeback()
        await window.flush()
        assert cached_bytes(path) == 16 * MiB
        await debug.drop_cache(2 * MiB, 2 * MiB)  # bytes 6-8 MiB of the file
        assert cached_bytes(path, 6 * MiB, 2 * MiB) == 0
        assert cached_bytes(path) == 14 * MiB
        await window.drop_cache()
        assert cached_bytes(path, 4 * MiB, 8 * MiB) == 0
        assert cached_bytes(path) == 8 * MiB  # the 4 MiB on each side of the window
        with pytest.raises(OSError, match="outside w") as info:
            await window.drop_cache(8 * MiB, 1)
        assert info.value.errno == errno.EINVAL

        kept = tmp_path / "k.img"
        kept.write_bytes(os.urandom(4 * MiB))
        os.sync()
        node = await graph.add({**_file_opts(kept), "node-name": "k", "cache": {"no-flush": True}})
        assert not node.early_writeback()
        await node.drop_cache()
        assert cached_bytes(kept) == 4 * MiB
        null = await graph.add({"driver": "null-co", "node-name": "n", "size": MiB})
        assert not null.early_writeback()
        await null.drop_cache()
        if _o_direct_supported(tmp_path):
            direct = await graph.add(
                {**_file_opts(kept), "node-name": "d", "cache": {"direct": True}}
            )
            assert not direct.early_writeback()
            await direct.drop_cache()
    finally:
        await graph.aclose()
