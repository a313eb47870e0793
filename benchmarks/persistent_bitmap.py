"""Write cost of a persistent dirty bitmap (the write-ahead dirty log), in process.

4 KiB random writes, 16 at a time, through a raw node over a file: with no bitmap, with a
non-persistent bitmap, and with a persistent one on a first pass over clean granules and on
a second pass over the same (already durable) granules. Prints IOPS and ratios.

    .venv/bin/python benchmarks/persistent_bitmap.py [--size-mib 1024] [--writes 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Iterator

from blockbackup.api import BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of

results_pass: list[float] = []


async def _run(path: str, mode: str, offsets: list[int], depth: int) -> float:
    async with BlockBackup() as bb:
        node = await bb.blockdev_add(
            {"driver": "raw", "node-name": "d", "file": {"driver": "file", "filename": path}}
        )
        if mode != "none":
            bitmaps_of(node).create("b", 65536, persistent=mode != "volatile")
        buf = os.urandom(4096)
        passes = 2 if mode == "persistent" else 1
        rates = []
        for _ in range(passes):
            os.sync()  # start each pass without writeback of the previous one
            queue = iter(offsets)

            async def worker(queue: Iterator[int]) -> None:
                for off in queue:
                    await node.write(off, buf)

            t = time.perf_counter()
            await asyncio.gather(*(worker(queue) for _ in range(depth)))
            rates.append(len(offsets) / (time.perf_counter() - t))
        if mode == "persistent":
            print(f"  persistent first pass  {rates[0]:10.0f} IOPS")
            print(f"  persistent rewrites    {rates[1]:10.0f} IOPS")
            results_pass.append(rates[1])
            return rates[0]
        print(f"  {mode:22s} {rates[0]:10.0f} IOPS")
        return rates[0]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = args.size_mib << 20
    rnd = random.Random(1)
    offsets = [rnd.randrange(size // 4096) * 4096 for _ in range(args.writes)]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        results = {}
        for mode in ("none", "volatile", "persistent"):
            path = os.path.join(d, f"{mode}.img")
            with open(path, "wb") as f:
                f.truncate(size)
            results[mode] = await _run(path, mode, offsets, args.depth)
        first, rewrite = results["persistent"], results_pass[0]
        base = results["volatile"]
        print(
            f"first pass / volatile: {first / base:.3f}   rewrites / volatile: {rewrite / base:.3f}"
        )


asyncio.run(main())
