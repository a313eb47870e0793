"""In-process qcow2 allocating writes, no NBD: our driver against ``qemu-img bench -w``.

Why: ``qcow2_io.py`` goes through NBD, whose cost hides the qcow2 driver's. Here
``--depth`` tasks call ``BlockNode.write`` on a qcow2 node over a file node directly (the
graph the daemon builds), on a fresh ``qemu-img create -f qcow2`` image of 16 GiB, and
``qemu-img bench`` runs the same pattern on the same kind of image in the same run:

- ``alloc-4k-stride``: 4 KiB writes, one per 64 KiB cluster in ascending order (every
  write allocates a cluster and is a sub-cluster first write); QEMU: ``-s 4096 -S 65536``;
- ``seq-1m``: 1 MiB sequential allocating writes (QD4); QEMU: ``-s 1M -d 4``.

``qemu-img bench`` is a C loop with no protocol, so it is the driver's ceiling, not a goal:
the ratio shows how much of the per-write cost is our driver. ``--profile`` prints the top
of a cProfile of our side (CPU per write).

Usage: ``.venv/bin/python benchmarks/qcow2_alloc.py [--count 20000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from blockbackup.block.graph import Graph

VIRTUAL = 16 << 30
CLUSTER = 64 << 10


async def _ours(image: str, bs: int, step: int, depth: int, count: int) -> tuple[float, float]:
    """(writes per second, process CPU microseconds per write) of ``count`` writes of
    ``bs`` bytes, ``step`` apart. CPU per write moves less than the rate when other work
    shares the machine."""
    graph = Graph()
    node = await graph.add(
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": image}}
    )
    data = os.urandom(bs)
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < count:
            off = nxt * step
            nxt += 1
            await node.write(off, data)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(depth)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await graph.delete("q")
    return count / elapsed, cpu / count * 1e6


def _qemu(image: str, bs: int, step: int, depth: int, count: int) -> float:
    out = subprocess.run(
        ["qemu-img", "bench", "-w", "-f", "qcow2", "-t", "writeback", "-c", str(count),
         "-d", str(depth), "-s", str(bs), "-S", str(step), image],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if m is None:
        raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
    return count / float(m.group(1))


def _fresh(path: Path) -> str:
    if path.exists():
        path.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(VIRTUAL)], check=True)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000, help="4 KiB writes per run")
    ap.add_argument("--seq-mib", type=int, default=512, help="1 MiB writes per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile our 4 KiB run")
    args = ap.parse_args()
    workloads = {
        "alloc-4k-stride": (4096, CLUSTER, 16, args.count),
        "seq-1m": (1 << 20, 1 << 20, 4, args.seq_mib),
    }
    d = Path(tempfile.mkdtemp(prefix="bbq2alloc", dir="/tmp"))
    try:
        img = d / "img.qcow2"
        if args.profile:
            bs, step, depth, count = workloads["alloc-4k-stride"]
            prof = cProfile.Profile()
            prof.enable()
            rate, _ = asyncio.run(_ours(_fresh(img), bs, step, depth, count))
            prof.disable()
            print(f"profiled: {rate:.0f} writes/s")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return
        print(f"{'job':<16} {'ours':>10} {'qemu-img':>10} ratio  (writes/s)  ours CPU/write")
        for name, (bs, step, depth, count) in workloads.items():
            for _ in range(args.repeat):
                ours, us = asyncio.run(_ours(_fresh(img), bs, step, depth, count))
                ref = _qemu(_fresh(img), bs, step, depth, count)
                print(
                    f"{name:<16} {ours:>10.0f} {ref:>10.0f} {ours / ref:.2f}x {us:>8.1f} us",
                    flush=True,
                )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
