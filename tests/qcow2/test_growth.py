"""The qcow2 node under the request-layer contract, and how it grows its file.

qcow2 grows its image file through ``BlockNode.truncate`` in large steps (not one resize per
allocated cluster), gives the slack back on close, refuses cleanly where its file cannot
grow, and serialises concurrent allocating writes to the same cluster while letting their
data writes run outside the metadata lock.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import sys
from pathlib import Path

import pytest

from block.driver_conformance import check_block_driver
from blockbackup.block.graph import Graph
from blockbackup.block.node import BlockNode
from blockbackup.block.qcow2.create import create_qcow2_file

sys.path.insert(0, str(Path(__file__).parent))
from qcow2_helpers import check_clean, needs_qemu, qcow2_opts, run

pytestmark = pytest.mark.asyncio
MiB = 1 << 20


def _factory(cluster_size: int):  # type: ignore[no-untyped-def]
    async def factory(
        graph: Graph, *, name: str, directory: Path, size: int, read_only: bool
    ) -> BlockNode:
        path = directory / "disk.qcow2"
        if not path.exists():
            create_qcow2_file(path, size, cluster_size=cluster_size)
        opts = qcow2_opts(path, name, **{"read-only": read_only})
        opts["file"]["read-only"] = read_only
        return await graph.add(opts)

    return factory


@pytest.mark.parametrize("cluster", [4096, 65536])
async def test_conformance_qcow2(tmp_path: Path, cluster: int) -> None:
    await check_block_driver(_factory(cluster), tmp_path, seed=11)


def _count_truncates(node: BlockNode) -> list[int]:
    calls: list[int] = []
    real = node.truncate

    async def counting(size: int) -> None:
        calls.append(size)
        await real(size)

    node.truncate = counting  # type: ignore[method-assign]
    return calls


@needs_qemu
async def test_grows_in_steps_and_trims_on_close(tmp_path: Path, graph: Graph) -> None:
    img = tmp_path / "a.qcow2"
    create_qcow2_file(img, 64 * MiB)
    node = await graph.add(qcow2_opts(img))
    calls = _count_truncates(node.children["file"])
    data = random.Random(1).randbytes(8 * MiB)
    for offset in range(0, len(data), 65536):  # 128 allocating writes, one cluster each
        await node.write(offset, data[offset : offset + 65536])
    assert 1 <= len(calls) <= 12, calls
    assert all(b > a for a, b in itertools.pairwise(calls)), calls
    assert os.stat(img).st_size >= 8 * MiB
    await graph.delete("q")
    info = run("qemu-img", "check", "--output=json", img)
    end = int(info.split('"image-end-offset":')[1].split(",")[0])
    assert os.stat(img).st_size == end  # the slack past the last cluster was given back
    check_clean(img)
    node = await graph.add(qcow2_opts(img, "q", **{"read-only": True}))
    assert bytes(await node.read(0, len(data))) == data


@needs_qemu
async def test_grows_through_raw(tmp_path: Path, graph: Graph) -> None:
    img = tmp_path / "a.qcow2"
    create_qcow2_file(img, 8 * MiB)
    opts = qcow2_opts(img)
    opts["file"] = {"driver": "raw", "file": opts["file"]}
    node = await graph.add(opts)
    await node.write(MiB, b"\x5a" * (3 * MiB))
    await graph.delete("q")
    check_clean(img)
    node = await graph.add(qcow2_opts(img, "q", **{"read-only": True}))
    assert bytes(await node.read(MiB, 3 * MiB)) == b"\x5a" * (3 * MiB)


async def test_refused_where_the_file_cannot_grow(tmp_path: Path, graph: Graph) -> None:
    img = tmp_path / "a.qcow2"
    create_qcow2_file(img, 8 * MiB)
    size = os.stat(img).st_size
    opts = qcow2_opts(img)
    opts["file"] = {"driver": "raw", "file": opts["file"], "size": size}  # a fixed window
    node = await graph.add(opts)
    with pytest.raises(OSError, match=os.strerror(errno.ENOTSUP)) as err:
        await node.write(0, b"x" * 4096)
    assert err.value.errno == errno.ENOTSUP
    assert os.stat(img).st_size == size


@needs_qemu
async def test_concurrent_allocating_writes(tmp_path: Path, graph: Graph) -> None:
    """Many partial writes racing for the same few unallocated clusters lose nothing."""
    img = tmp_path / "a.qcow2"
    cluster = 65536
    size = 8 * cluster
    create_qcow2_file(img, size, cluster_size=cluster)
    node = await graph.add(qcow2_opts(img))
    rng = random.Random(7)
    model = bytearray(size)
    writes: list[tuple[int, bytes]] = []
    for i in range(200):  # disjoint 512-byte pieces, shuffled: order cannot matter
        offset = rng.randrange(size // 512) * 512
        data = bytes([i % 255 + 1]) * 512
        writes.append((offset, data))
    seen: set[int] = set()
    unique = [(o, d) for o, d in writes if not (o in seen or seen.add(o))]  # type: ignore[func-returns-value]
    for offset, data in unique:
        model[offset : offset + 512] = data
    await asyncio.gather(*(node.write(o, d) for o, d in unique))
    assert bytes(await node.read(0, size)) == bytes(model)
    await graph.delete("q")
    check_clean(img)
    node = await graph.add(qcow2_opts(img, "q", **{"read-only": True}))
    assert bytes(await node.read(0, size)) == bytes(model)
