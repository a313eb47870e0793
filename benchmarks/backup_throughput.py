"""Full-backup throughput and guest impact, against cp and qemu-img in the same run.

Why: the core issue sets goals relative to references measured on the same machine in the
same run: a full backup of a raw file of random data to a raw file at >= 0.9x of
``cp --sparse=always`` with the copy-offload path and >= 0.7x without it; and, for guest
impact, an in-process writer (4 KiB random writes, queue depth 16) keeping >= 0.5x of its
rate and <= 10x of its p99 latency while an unlimited backup runs.

Durability is part of the comparison. A backup job reports success only after flushing
its target (docs/architecture.md), while ``cp`` never syncs and ``qemu-img convert``
defaults to ``-t unsafe`` (no flush). So every copier runs twice: to the page cache (ours
with ``cache.no-flush`` on the target, like qemu-img's default) and to durable storage
(``cp`` followed by ``sync --data``, ``qemu-img convert -t writeback``, our default).
Each side is compared with ``cp`` of the same kind.

All copies run on a warm page cache (the source is read once first) after a ``sync`` (no
copier pays for another's dirty pages) with warm free memory (see ``_settle.settle``), in
``--repeat`` interleaved rounds (a noisy moment hits every copier alike), best kept. Usage:

    .venv/bin/python benchmarks/backup_throughput.py [--size-mib 2048] [--repeat 3]
        [--only throughput|guest]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _settle import settle
from blockbackup.api import BlockBackup
from blockbackup.demo import Writer
from blockbackup.jobs.backup import BackupPerf

MiB = 1 << 20


def make_source(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    with open(path, "rb") as f:  # warm the page cache like every reference gets it
        while f.read(16 * MiB):
            pass


def fresh_target(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def raw(name: str, path: Path, *, flush: bool = True) -> dict[str, object]:
    file: dict[str, object] = {"driver": "file", "filename": str(path)}
    if not flush:
        file["cache"] = {"no-flush": True}
    return {"driver": "raw", "node-name": name, "file": file}


async def backup_seconds(
    src: Path, tgt: Path, size: int, copy_range: bool, *, flush: bool = True
) -> float:
    async with BlockBackup() as bb:
        await bb.blockdev_add(raw("src", src))
        await bb.blockdev_add(raw("tgt", tgt, flush=flush))
        start = time.perf_counter()
        job = await bb.backup("src", "tgt", perf=BackupPerf(use_copy_range=copy_range))
        await bb.wait(job)
        return time.perf_counter() - start


async def guest_impact(src: Path, tgt: Path, size: int, seconds: float) -> dict[str, float]:
    async with BlockBackup() as bb:
        disk = await bb.blockdev_add(raw("src", src))
        await bb.blockdev_add(raw("tgt", tgt))
        writer = Writer(disk)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.run())
            await asyncio.sleep(seconds)
            t_start = time.perf_counter()
            job = await bb.backup("src", "tgt")
            await bb.wait(job)
            t_end = time.perf_counter()
            writer.stop()
        base_rate, base_p99 = writer.stats(t_start - seconds + 0.2, t_start)
        job_rate, job_p99 = writer.stats(t_start, t_end)
    return {
        "base_rate": base_rate,
        "base_p99": base_p99,
        "job_rate": job_rate,
        "job_p99": job_p99,
        "job_seconds": t_end - t_start,
    }


Copiers = dict[tuple[str, bool], Callable[[], float]]


def throughput_copiers(src: Path, tgt: Path, size: int) -> Copiers:
    """(name, durable) -> a callable timing one copy of ``src`` onto ``tgt``."""

    def cp(durable: bool) -> float:
        tgt.unlink(missing_ok=True)
        settle(size)
        took = timed(["cp", "--sparse=always", str(src), str(tgt)])
        return took + (timed(["sync", "--data", str(tgt)]) if durable else 0.0)

    def convert(durable: bool) -> float:
        fresh_target(tgt, size)
        settle(size)
        cache = "writeback" if durable else "unsafe"
        return timed(["qemu-img", "convert", "-n", "-t", cache, "-f", "raw", "-O", "raw",
                      str(src), str(tgt)])  # fmt: skip

    def ours(copy_range: bool, durable: bool) -> float:
        fresh_target(tgt, size)
        settle(size)
        return asyncio.run(backup_seconds(src, tgt, size, copy_range, flush=durable))

    copiers: Copiers = {}
    for durable in (False, True):
        copiers[("cp --sparse=always", durable)] = functools.partial(cp, durable)
        if shutil.which("qemu-img"):
            copiers[("qemu-img convert -n", durable)] = functools.partial(convert, durable)
        for copy_range in (True, False):
            name = f"blockbackup (copy-range {'on' if copy_range else 'off'})"
            copiers[(name, durable)] = functools.partial(ours, copy_range, durable)
    return copiers


def print_impact(impact: dict[str, float]) -> None:
    print("guest impact: 4 KiB random writes, QD16, in-process, unlimited full backup")
    base, during = impact["base_rate"], impact["job_rate"]
    print(f"  without backup: {base:8.0f} writes/s  p99 {impact['base_p99']:.2f} ms")
    print(
        f"  during backup:  {during:8.0f} writes/s  p99 {impact['job_p99']:.2f} ms"
        f"  (backup took {impact['job_seconds']:.1f} s)"
    )
    print(
        f"  rate ratio {during / base:.2f}x (goal >= 0.5x), "
        f"p99 ratio {impact['job_p99'] / impact['base_p99']:.1f}x (goal <= 10x)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--only", choices=("throughput", "guest"), help="run one part")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # not QEMU's no-cluster-size warning per run
    size = args.size_mib * MiB
    work = Path(args.dir or tempfile.mkdtemp(prefix="bb-bench-"))
    src, tgt = work / "src.img", work / "tgt.img"
    try:
        make_source(src, size)
        if args.only != "guest":
            copiers = throughput_copiers(src, tgt, size)
            seconds: dict[tuple[str, bool], list[float]] = {key: [] for key in copiers}
            for _ in range(args.repeat):
                for key, run in copiers.items():
                    seconds[key].append(run())
            print(f"full backup of {args.size_mib} MiB of random data, raw -> raw, warm cache")
            for durable in (False, True):
                print("  to durable storage (synced at the end):" if durable else "  to cache:")
                cp = size / MiB / min(seconds[("cp --sparse=always", durable)])
                for (name, kind), times in seconds.items():
                    if kind is durable:
                        rate = size / MiB / min(times)
                        print(f"    {name:34} {rate:8.0f} MiB/s   {rate / cp:5.2f}x cp")
        if args.only != "throughput":
            # The source keeps each round's guest writes: the data stays random.
            for _ in range(args.repeat if args.only == "guest" else 1):
                fresh_target(tgt, size)
                settle(size)
                print_impact(asyncio.run(guest_impact(src, tgt, size, 2.0)))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
