"""In-process request path: concurrent ``BlockNode`` reads and writes, no NBD.

Why: the NBD figures mix protocol, socket and request-layer costs. This isolates the
request layer plus the file driver and the thread pools: ``--depth`` tasks each loop on
``node.write`` (or ``node.read``) of ``--bs`` bytes at random (or sequential) offsets for
``--seconds``, on a ``raw`` node over a ``file`` node, exactly the graph the daemon builds
for a qemu-storage-daemon-style command line.

Usage: ``.venv/bin/python benchmarks/request_path.py [--uvloop] [--seconds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from blockbackup.block.graph import Graph


async def _run(
    image: str, op: str, bs: int, depth: int, seconds: float, sequential: bool
) -> tuple[float, float]:
    """(requests per second, MiB per second) for one workload."""
    graph = Graph()
    node = await graph.add(
        {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": image}}
    )
    size = node.size
    blocks = size // bs
    data = os.urandom(bs)
    count = 0
    stop = time.perf_counter() + seconds
    position = 0

    def next_offset() -> int:
        nonlocal position
        if sequential:
            position = (position + 1) % blocks
            return position * bs
        return random.randrange(blocks) * bs

    async def worker() -> None:
        nonlocal count
        call: Callable[[int], Awaitable[object]]
        if op == "write":

            async def call(off: int) -> None:
                await node.write(off, data)

        else:

            async def call(off: int) -> None:
                await node.read(off, bs)

        while time.perf_counter() < stop:
            await call(next_offset())
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(depth)))
    elapsed = time.perf_counter() - start
    await graph.delete("r")
    return count / elapsed, count * bs / elapsed / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated workload names")
    args = ap.parse_args()
    workloads = {
        "randwrite-4k-qd16": ("write", 4096, 16, False),
        "randread-4k-qd16": ("read", 4096, 16, False),
        "seqwrite-1m-qd4": ("write", 1 << 20, 4, True),
        "seqread-1m-qd4": ("read", 1 << 20, 4, True),
    }
    chosen = [w for w in args.only.split(",") if w] or list(workloads)
    d = Path(tempfile.mkdtemp(prefix="bbreq", dir="/tmp"))
    try:
        image = d / "img.raw"
        with open(image, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                f.write(block)
        runner: Callable[[Coroutine[Any, Any, tuple[float, float]]], tuple[float, float]]
        runner = asyncio.run
        if args.uvloop:
            import uvloop

            runner = uvloop.run
        loop = "uvloop" if args.uvloop else "asyncio"
        for name in chosen:
            op, bs, depth, seq = workloads[name]
            rate, mib = runner(_run(str(image), op, bs, depth, args.seconds, seq))
            print(f"{loop:>8} {name:<18} {rate:>9.0f} req/s {mib:>8.1f} MiB/s", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
