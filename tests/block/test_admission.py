"""The one admission function per request kind (``BlockNode.submit_read`` / ``submit_write``).

Why: the NBD server completes cached requests inline and hands the rest to a task, and
``read`` / ``write`` are the same functions awaited. The contract that makes this safe is
checked here with real files: inline means done (every hook passed at once), and what is
returned holds nothing until it runs, so a caller may run it later or close it unrun
without leaving a count that would hold a quiesce, or a write half done.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from blockbackup.block.driver import PartialWrite
from blockbackup.block.drivers.blkdebug import BlkdebugDriver, IOType
from blockbackup.block.graph import Graph
from blockbackup.block.node import BlockNode

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]
MiB = 1 << 20


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[BlockNode]:
    path = tmp_path / "a.img"
    path.write_bytes(b"\x11" * MiB)
    graph = Graph()
    try:
        yield await graph.add(
            {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(path)}}
        )
    finally:
        await graph.aclose()


async def test_cached_requests_complete_inline(node: BlockNode) -> None:
    await node.read(0, 4096)  # cached now
    assert bytes(node.submit_read(0, 4096)) == b"\x11" * 4096  # type: ignore[arg-type]
    assert node.submit_write(0, b"\x22" * 4096) is None
    assert bytes(await node.read(0, 4096)) == b"\x22" * 4096


async def test_a_hook_that_waits_makes_the_write_wait(node: BlockNode) -> None:
    seen: list[tuple[int, int]] = []

    async def hook(offset: int, length: int) -> None:
        seen.append((offset, length))

    node.add_before_write(hook)
    pending = node.submit_write(4096, b"\x33" * 512)
    assert pending is not None
    assert seen == []  # nothing done yet
    pending.close()  # dropped unrun: no count left behind, nothing written
    async with asyncio.timeout(5), node.quiesced():
        pass
    assert bytes(await node.read(4096, 512)) == b"\x11" * 512
    pending = node.submit_write(4096, b"\x33" * 512)
    assert pending is not None
    await pending
    assert seen == [(4096, 512)]
    assert bytes(await node.read(4096, 512)) == b"\x33" * 512
    node.remove_before_write(hook)


async def test_quiesced_requests_wait_and_run_later(node: BlockNode) -> None:
    await node.read(0, 4096)
    async with node.quiesced():
        read = node.submit_read(0, 4096)
        assert not isinstance(read, bytes | bytearray | memoryview)  # reads are not held...
        assert bytes(await read) == b"\x11" * 4096  # ...but go the awaited way
        write = node.submit_write(0, b"\x44" * 4096)
        assert write is not None
        task = asyncio.create_task(write)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert not task.done()  # held until the quiesce ends
    await task
    assert bytes(await node.read(0, 4096)) == b"\x44" * 4096


async def test_checks_fail_at_admission(node: BlockNode) -> None:
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as err:
        node.submit_write(MiB - 1, b"xx")
    assert err.value.errno == errno.EINVAL
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as err:
        node.submit_read(MiB, 1)
    assert err.value.errno == errno.EINVAL
    assert node.read_now(MiB, 1) is None  # the inline-only wrappers decline instead
    assert not node.write_now(MiB - 1, b"xx")


async def test_read_many_is_each_range_read(node: BlockNode, tmp_path: Path) -> None:
    await node.write(8192, b"\x55" * 4096)
    ranges = [(0, 4096), (8192, 4096), (MiB - 100, 100), (4096, 8192)]
    expected = [bytes(await node.read(o, n)) for o, n in ranges]
    assert [bytes(d) for d in await node.read_many(ranges)] == expected  # one pool call
    into = memoryview(bytearray(2 * MiB))
    assert [bytes(d) for d in await node.read_many(ranges, into)] == expected
    assert bytes(into[4096:8192]) == b"\x55" * 4096  # read into the caller's buffer
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)):
        await node.read_many([(0, 4096), (MiB - 1, 2)])  # checked before anything is read
    # A node that is not plain file data reads one range at a time: the same data.
    other = await node.graph.add(
        {
            "driver": "blkdebug",
            "node-name": "d",
            "image": {"driver": "file", "filename": str(tmp_path / "a.img")},
        }
    )
    assert other.fd_map(0) is None
    assert [bytes(d) for d in await other.read_many(ranges)] == expected


async def test_write_many_admits_each_piece(node: BlockNode) -> None:
    marked: list[tuple[int, int]] = []

    class Tracker:
        def mark_dirty(self, offset: int, length: int) -> None:
            marked.append((offset, length))

    node.dirty_trackers.append(Tracker())  # type: ignore[arg-type]
    pieces = [(0, b"\x61" * 4096), (65536, b"\x62" * 100), (MiB - 10, b"\x63" * 10)]
    await node.write_many(pieces)
    assert marked == [(0, 4096), (65536, 100), (MiB - 10, 10)]
    for offset, data in pieces:
        assert bytes(await node.read(offset, len(data))) == data
    async with asyncio.timeout(5), node.quiesced():
        pass  # nothing left in flight

    # A hook that must be awaited: each piece goes the awaited write's way, hook first.
    seen: list[tuple[int, int]] = []

    async def hook(offset: int, length: int) -> None:
        seen.append((offset, length))

    node.add_before_write(hook)
    await node.write_many([(4096, b"\x64" * 512), (8192, b"\x65" * 512)])
    assert seen == [(4096, 512), (8192, 512)]
    assert bytes(await node.read(4096, 512)) == b"\x64" * 512
    node.remove_before_write(hook)
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)):
        await node.write_many([(0, b"x"), (MiB - 1, b"xx")])
    assert bytes(await node.read(0, 1)) == b"\x61"  # nothing written


async def test_write_many_says_how_far_it_got(node: BlockNode, tmp_path: Path) -> None:
    """A failed piece: the error is its own, and the pieces before it are written."""
    other = await node.graph.add(
        {
            "driver": "blkdebug",
            "node-name": "d",
            "image": {"driver": "file", "filename": str(tmp_path / "a.img")},
        }
    )
    assert isinstance(other.driver, BlkdebugDriver)
    other.driver.add_rule(IOType.WRITE, errno.ENOSPC, offset=65536, length=4096)
    pieces = [(0, b"\x71" * 4096), (65536, b"\x72" * 4096), (131072, b"\x73" * 4096)]
    with pytest.raises(PartialWrite) as info:
        await other.write_many(pieces)
    assert info.value.written == 1
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror == os.strerror(errno.ENOSPC)
    assert bytes(await other.read(0, 4096)) == b"\x71" * 4096
    assert bytes(await other.read(131072, 4096)) == b"\x11" * 4096  # not tried
