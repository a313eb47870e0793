"""Filters forward what they do not change: truncate, cache hints, inline requests.

Why: a filter adds one behaviour to its child's I/O; everything else of the child must
show through it (a ``throttle`` node once refused ``truncate`` and hid the child's page
cache from ``drop_cache`` / ``early_writeback``). What would pass *by* a filter's
behaviour (an inline request past a limit or a blkdebug rule, copy offload past both) must
not be forwarded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from blockbackup.block.driver import DRIVERS, BlockDriver, register
from blockbackup.block.filters.forwarding import FilterDriver
from blockbackup.block.graph import Graph
from blockbackup.block.node import BlockNode
from testkit.images import cached_bytes, page_cache_drops

pytestmark = pytest.mark.asyncio
MiB = 1 << 20
_names = itertools.count()


@pytest_asyncio.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    try:
        yield g
    finally:
        await g.aclose()


@pytest.fixture
def group(graph: Graph) -> str:
    """A throttle group of the graph with a generous write limit (never waits here)."""
    name = f"fwd{next(_names)}"
    graph.objects.add("throttle-group", name, {"limits": {"bps-write": 1 << 40}})
    return name


def _file(path: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": str(path), **extra}


async def throttled_file(graph: Graph, path: Path, group: str) -> BlockNode:
    await graph.add(_file(path, "f"))
    opts = {"driver": "throttle", "node-name": "t", "throttle-group": group, "file": "f"}
    return await graph.add(opts)


async def test_truncate_through_throttle(tmp_path: Path, graph: Graph, group: str) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"\x11" * MiB)
    node = await throttled_file(graph, path, group)
    await node.truncate(3 * MiB)
    assert node.size == 3 * MiB == os.stat(path).st_size
    assert bytes(await node.read(MiB - 4, 8)) == b"\x11" * 4 + bytes(4)
    await node.truncate(MiB // 2)
    assert node.size == MiB // 2 == os.stat(path).st_size


async def test_cache_hints_through_throttle(tmp_path: Path, graph: Graph, group: str) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(os.urandom(4 * MiB))
    node = await throttled_file(graph, path, group)
    assert node.early_writeback()  # a buffered file under it: writeback suits it
    if not page_cache_drops(tmp_path):
        pytest.skip("this file system never evicts its pages (tmpfs)")
    await node.flush()
    assert cached_bytes(path) == 4 * MiB
    await node.drop_cache(2 * MiB, 2 * MiB)
    assert cached_bytes(path, 2 * MiB, 2 * MiB) == 0
    assert cached_bytes(path, 0, 2 * MiB) == 2 * MiB


async def test_inline_requests_stop_at_a_limit(tmp_path: Path, graph: Graph, group: str) -> None:
    """A throttle with limits declines inline requests (they wait on the awaited path);
    one without limits forwards them; copy offload never passes a filter."""
    path = tmp_path / "a.img"
    path.write_bytes(b"\x22" * MiB)
    limited = await throttled_file(graph, path, group)
    await limited.read(0, 4096)  # cached
    assert graph.get("f").read_now(0, 4096) is not None
    assert limited.read_now(0, 4096) is None
    assert not limited.write_now(0, b"\x33" * 4096)
    assert limited.fd_map(0) is None
    free = f"free{next(_names)}"
    graph.objects.add("throttle-group", free, {})
    try:
        node = await graph.add(
            {"driver": "throttle", "node-name": "u", "throttle-group": free, "file": "f"}
        )
        assert bytes(node.read_now(0, 4096) or b"") == b"\x22" * 4096
        assert node.write_now(0, b"\x33" * 4096)
        assert path.read_bytes()[:4096] == b"\x33" * 4096
    finally:
        await graph.delete("u")
        graph.objects.delete(free)


async def test_blkdebug_forwards_truncate_not_inline_writes(tmp_path: Path, graph: Graph) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"\x44" * MiB)
    await graph.add(_file(path, "f"))
    node = await graph.add({"driver": "blkdebug", "node-name": "d", "image": "f"})
    assert not node.write_now(0, b"\x55" * 4096)  # a rule added later must see every write
    await node.truncate(2 * MiB)
    assert os.stat(path).st_size == 2 * MiB


async def test_every_filter_forwards_through_the_base() -> None:
    filters = {name for name, cls in DRIVERS.items() if cls.is_filter}
    assert {"throttle", "copy-before-write", "blkdebug"} <= filters
    for name in filters | {"snapshot-access"}:
        assert issubclass(DRIVERS[name], FilterDriver), name


class _Doubling(FilterDriver):
    """A filter that changes reads through its awaited ``read`` only (no ``submit_read``)."""

    driver_name = "test-doubling"

    @classmethod
    async def open(cls, node: BlockNode, opts: Any) -> _Doubling:  # pragma: no cover
        raise NotImplementedError

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(await self.child.read(offset, length)) * 2


async def test_a_filter_changing_only_the_awaited_read_is_never_passed_inline(
    tmp_path: Path, graph: Graph
) -> None:
    """A read is one call (``submit_read``) for both paths: a filter that overrides only
    ``read`` gets the default admission, which awaits that ``read``, so no inline read
    goes past it to the child."""
    path = tmp_path / "a.img"
    path.write_bytes(b"\x22" * MiB)
    child = await graph.add(_file(path, "f"))
    await child.read(0, 4096)  # cached: the child itself would answer at once
    driver = _Doubling(child, child)
    pending = driver.submit_read(0, 4096)
    assert not isinstance(pending, bytes | bytearray | memoryview)
    assert await pending == b"\x22" * 8192
    assert await driver.read(0, 4096) == b"\x22" * 8192


async def test_a_driver_must_implement_one_of_each_request() -> None:
    class Neither(FilterDriver):
        driver_name = "test-neither"

    # A filter forwards both: fine. A plain driver with neither would recurse: refused.
    register(Neither)
    DRIVERS.pop("test-neither")
    with pytest.raises(TypeError, match="implements neither read nor submit_read"):
        register(type("Bare", (BlockDriver,), {"driver_name": "test-bare"}))
    assert "test-bare" not in DRIVERS
