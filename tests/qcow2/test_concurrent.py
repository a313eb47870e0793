"""Concurrent allocating writes on a qcow2 node: many requests in flight at once, to the
same and to neighbouring clusters, mixed with zero-writes, flushes and (small caches)
metadata evictions. The image must match a byte model, reopen with the same content, pass
``qemu-img check`` without errors or leaks, and ``qemu-img compare`` equal to the model.

Allocations without I/O take a lock-free synchronous path; these tests make that path run
next to the locked one (cache misses, COW from a backing file, flushes holding the lock)."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qcow2_helpers import check_clean, needs_qemu, qcow2_opts, run

from blockbackup.block.driver import WriteFlags
from blockbackup.block.graph import Graph
from blockbackup.block.qcow2.create import create_qcow2_file

pytestmark = [pytest.mark.qemu, needs_qemu]


def _batch(rng: random.Random, size: int, cluster: int, count: int) -> list[tuple[int, int]]:
    """Disjoint byte ranges crowded into a few neighbouring clusters (so writes share
    clusters and neighbours), in random order."""
    base = rng.randrange(0, size // cluster - 4) * cluster
    span = min(size - base, cluster * rng.choice([1, 2, 4]))
    cuts = sorted(rng.sample(range(1, span), min(span - 1, count * 2)))
    bounds = [0, *cuts, span]
    ranges = [(base + a, b - a) for a, b in itertools.pairwise(bounds)]
    rng.shuffle(ranges)
    return ranges[:count]


async def _run(
    tmp: Path, seed: int, cluster: int, backing: bool, small_cache: bool
) -> tuple[Path, bytearray]:
    size = 64 * cluster
    img = tmp / "c.qcow2"
    kwargs: dict[str, object] = {"cluster_size": cluster}
    model = bytearray(size)
    if backing:
        model = bytearray(random.Random(seed).randbytes(size))
        (tmp / "b.raw").write_bytes(model)
        kwargs.update(backing_file="b.raw", backing_fmt="raw")
    create_qcow2_file(img, size, **kwargs)
    extra: dict[str, Any] = (
        {"l2-cache-size": 4 * cluster, "refcount-cache-size": 4 * cluster} if small_cache else {}
    )
    rng = random.Random(seed)
    g = Graph()
    try:
        node = await g.add(qcow2_opts(img, **extra))
        for round_ in range(40):
            ops: list[Awaitable[None]] = []
            for off, ln in _batch(rng, size, cluster, rng.randrange(2, 17)):
                if rng.random() < 0.15:
                    ops.append(node.write_zeroes(off, ln, WriteFlags.NONE))
                    model[off : off + ln] = bytes(ln)
                else:
                    data = rng.randbytes(ln)
                    ops.append(node.write(off, data))
                    model[off : off + ln] = data
            if round_ % 3 == 1:
                ops.insert(rng.randrange(len(ops) + 1), node.flush())
            await asyncio.gather(*ops)
            if round_ % 10 == 9:
                assert bytes(await node.read(0, size)) == bytes(model)
        assert bytes(await node.read(0, size)) == bytes(model)
        await g.delete("q")
        node = await g.add(qcow2_opts(img))
        assert bytes(await node.read(0, size)) == bytes(model)
    finally:
        await g.aclose()
    return img, model


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("cluster", "backing", "small_cache"),
    [(512, False, True), (4096, False, False), (65536, False, False), (4096, True, True)],
)
def test_concurrent_allocating_writes(
    tmp_path: Path, seed: int, cluster: int, backing: bool, small_cache: bool
) -> None:
    img, model = asyncio.run(_run(tmp_path, seed, cluster, backing, small_cache))
    check_clean(img)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, expected)


def test_concurrent_writes_into_one_fresh_cluster(tmp_path: Path) -> None:
    """Sixteen 4 KiB writes into one fresh 64 KiB cluster at once: one allocates it, the
    others wait for its L2 entry and then write in place; one cluster is used, no leak."""
    img = tmp_path / "one.qcow2"
    create_qcow2_file(img, 1 << 20, cluster_size=65536)
    chunks = [bytes([i + 1]) * 4096 for i in range(16)]

    async def main() -> None:
        g = Graph()
        try:
            node = await g.add(qcow2_opts(img))
            order = list(range(16))
            random.Random(7).shuffle(order)
            await asyncio.gather(*(node.write(65536 + i * 4096, chunks[i]) for i in order))
        finally:
            await g.aclose()

    asyncio.run(main())
    check_clean(img)
    expected = tmp_path / "one.raw"
    expected.write_bytes(bytes(65536) + b"".join(chunks) + bytes((1 << 20) - 2 * 65536))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, expected)
    # header, L1, refcount table, refcount block, L2 table, one data cluster
    info = run("qemu-img", "check", "--output=json", img)
    assert '"allocated-clusters": 1,' in info, info
