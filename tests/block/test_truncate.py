"""Resizing nodes: ``BlockNode.truncate`` and the drivers that implement it.

Image formats grow their file as they allocate clusters, so the request layer must let a
node change size safely: as a modification (held while quiesced, counted in flight),
never under a backup's interception, and only where the driver can (a regular file, raw
without a window); elsewhere with a clear errno.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from blockbackup.block.drivers.file import FileDriver
from blockbackup.block.graph import Graph
from testkit.loopdev import attached_loop

pytestmark = pytest.mark.asyncio
MiB = 1 << 20


@pytest_asyncio.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    try:
        yield g
    finally:
        await g.aclose()


def _sparse(path: Path, size: int, data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(data)
    return path


def _file(path: Path, name: str = "f", **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": str(path), **extra}


async def test_file_grow_and_shrink(tmp_path: Path, graph: Graph) -> None:
    path = _sparse(tmp_path / "a.img", MiB, b"\x11" * 4096)
    node = await graph.add(_file(path))
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as err:
        await node.write(MiB, b"x")
    assert err.value.errno == errno.EINVAL
    await node.truncate(3 * MiB)
    assert node.size == 3 * MiB == os.stat(path).st_size
    assert bytes(await node.read(MiB - 4096, 8192)) == bytes(8192)  # growth reads as zeroes
    await node.write(3 * MiB - 5, b"tail!")
    assert bytes(await node.read(3 * MiB - 5, 5)) == b"tail!"
    await node.truncate(2048)
    assert node.size == 2048 == os.stat(path).st_size
    assert bytes(await node.read(0, 2048)) == b"\x11" * 2048
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as err:
        await node.write(2048, b"x")
    assert err.value.errno == errno.EINVAL
    await node.truncate(2048)  # same size: nothing to do
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as err:
        await node.truncate(-1)
    assert err.value.errno == errno.EINVAL


async def test_read_only_refused(tmp_path: Path, graph: Graph) -> None:
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add(_file(path, "f", **{"read-only": True}))
    with pytest.raises(OSError, match=os.strerror(errno.EPERM)) as err:
        await node.truncate(2 * MiB)
    assert err.value.errno == errno.EPERM
    assert os.stat(path).st_size == MiB


async def test_raw_forwards_without_window(tmp_path: Path, graph: Graph) -> None:
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add({"driver": "raw", "node-name": "r", "file": _file(path)})
    file_node = node.children["file"]
    await node.truncate(5 * MiB)
    assert node.size == file_node.size == os.stat(path).st_size == 5 * MiB
    await node.write(5 * MiB - 4096, b"\x22" * 4096)
    await node.truncate(MiB)
    assert node.size == file_node.size == os.stat(path).st_size == MiB


@pytest.mark.parametrize("window", [{"offset": 4096}, {"size": MiB}, {"offset": 0, "size": 4096}])
async def test_raw_window_refused(tmp_path: Path, graph: Graph, window: dict[str, int]) -> None:
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add({"driver": "raw", "node-name": "r", "file": _file(path), **window})
    size = node.size
    with pytest.raises(OSError, match=os.strerror(errno.ENOTSUP)) as err:
        await node.truncate(2 * MiB)
    assert err.value.errno == errno.ENOTSUP
    assert node.size == size
    assert os.stat(path).st_size == MiB


async def test_default_driver_refuses(graph: Graph) -> None:
    node = await graph.add({"driver": "null-co", "node-name": "n", "size": MiB})
    with pytest.raises(OSError, match=os.strerror(errno.ENOTSUP)) as err:
        await node.truncate(2 * MiB)
    assert err.value.errno == errno.ENOTSUP
    assert node.size == MiB


async def test_block_device_growth_refused(tmp_path: Path, graph: Graph) -> None:
    """A file node over a block device (modelled by its device size) cannot grow past it."""
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add(_file(path))
    assert isinstance(node.driver, FileDriver)
    node.driver.device_size = MiB
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)) as err:
        await node.truncate(MiB + 512)
    assert err.value.errno == errno.ENOSPC
    await node.truncate(MiB // 2)  # a smaller window onto the device; the device is untouched
    assert node.size == MiB // 2
    assert os.stat(path).st_size == MiB
    await node.truncate(MiB)
    assert node.size == MiB


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    with attached_loop(_sparse(tmp_path / "loop.img", 2 * MiB)) as dev:
        yield dev


async def test_real_block_device_growth_refused(loop_device: str, graph: Graph) -> None:
    node = await graph.add(_file(Path(loop_device)))
    assert node.size == 2 * MiB
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)) as err:
        await node.truncate(4 * MiB)
    assert err.value.errno == errno.ENOSPC
    assert node.size == 2 * MiB


async def test_truncate_waits_while_quiesced(tmp_path: Path, graph: Graph) -> None:
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add(_file(path))
    for new_size in (2 * MiB, MiB // 2):  # growth and shrink are both held
        async with node.quiesced():
            task = asyncio.create_task(node.truncate(new_size))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not task.done()
            assert os.stat(path).st_size == node.size != new_size
        await task
        assert node.size == new_size == os.stat(path).st_size


async def test_quiesce_waits_for_truncate_in_flight(tmp_path: Path, graph: Graph) -> None:
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add(_file(path))
    task = asyncio.create_task(node.truncate(4 * MiB))
    await asyncio.sleep(0)  # admitted; ftruncate runs in the thread pool
    async with node.quiesced():
        assert task.done()
        assert node.size == 4 * MiB
    await task


async def test_refused_while_intercepted_or_tracked(tmp_path: Path, graph: Graph) -> None:
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add(_file(path))

    async def hook(offset: int, length: int) -> None:
        return None

    node.add_before_write(hook)
    with pytest.raises(OSError, match=os.strerror(errno.EBUSY)) as err:
        await node.truncate(2 * MiB)
    assert err.value.errno == errno.EBUSY
    node.remove_before_write(hook)

    class Tracker:
        def mark_dirty(self, offset: int, length: int) -> None:
            return None

    tracker = Tracker()
    node.dirty_trackers.append(tracker)
    with pytest.raises(OSError, match=os.strerror(errno.EBUSY)) as err:
        await node.truncate(MiB // 2)
    assert err.value.errno == errno.EBUSY
    node.dirty_trackers.remove(tracker)
    await node.truncate(2 * MiB)
    assert node.size == 2 * MiB


async def test_write_admitted_before_shrink_is_rechecked(tmp_path: Path, graph: Graph) -> None:
    """A write waiting at the quiesce gate fails cleanly if a shrink took its range away."""
    path = _sparse(tmp_path / "a.img", MiB)
    node = await graph.add(_file(path))
    async with node.quiesced():
        shrink = asyncio.create_task(node.truncate(4096))
        write = asyncio.create_task(node.write(MiB - 4096, b"x" * 4096))
        await asyncio.sleep(0)
    await shrink
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as err:
        await write
    assert err.value.errno == errno.EINVAL
    assert os.stat(path).st_size == 4096
