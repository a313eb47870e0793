"""Full-backup throughput and guest impact, against cp and qemu-img in the same run.

Why: the core issue sets goals relative to references measured on the same machine in the
same run: a full backup of a raw file of random data to a raw file at >= 0.9x of
``cp --sparse=always`` with the copy-offload path and >= 0.7x without it; and, for guest
impact, an in-process writer (4 KiB random writes, queue depth 16) keeping >= 0.5x of its
rate and <= 10x of its p99 latency while an unlimited backup runs.

All copies run on a warm page cache (the source is read once first), each measured
``--repeat`` times, best kept. Usage:

    .venv/bin/python benchmarks/backup_throughput.py [--size-mib 2048] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def raw(name: str, path: Path) -> dict[str, object]:
    return {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}}


async def backup_seconds(src: Path, tgt: Path, size: int, copy_range: bool) -> float:
    fresh_target(tgt, size)
    async with BlockBackup() as bb:
        await bb.blockdev_add(raw("src", src))
        await bb.blockdev_add(raw("tgt", tgt))
        start = time.perf_counter()
        job = await bb.backup("src", "tgt", perf=BackupPerf(use_copy_range=copy_range))
        await bb.wait(job)
        return time.perf_counter() - start


async def guest_impact(src: Path, tgt: Path, size: int, seconds: float) -> dict[str, float]:
    fresh_target(tgt, size)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    work = Path(args.dir or tempfile.mkdtemp(prefix="bb-bench-"))
    src, tgt = work / "src.img", work / "tgt.img"
    try:
        make_source(src, size)
        results: dict[str, float] = {}

        def best(name: str, seconds: list[float]) -> None:
            results[name] = size / MiB / min(seconds)

        best("cp --sparse=always", [
            (tgt.unlink(missing_ok=True), timed(["cp", "--sparse=always", str(src), str(tgt)]))[1]
            for _ in range(args.repeat)
        ])  # fmt: skip
        if shutil.which("qemu-img"):
            convert = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), str(tgt)]
            best("qemu-img convert -n", [
                (fresh_target(tgt, size), timed(convert))[1] for _ in range(args.repeat)
            ])  # fmt: skip
        for copy_range in (True, False):
            name = f"blockbackup (copy-range {'on' if copy_range else 'off'})"
            best(name, [
                asyncio.run(backup_seconds(src, tgt, size, copy_range)) for _ in range(args.repeat)
            ])  # fmt: skip
        cp = results["cp --sparse=always"]
        print(f"full backup of {args.size_mib} MiB of random data, raw -> raw, warm cache")
        for name, rate in results.items():
            print(f"  {name:34} {rate:8.0f} MiB/s   {rate / cp:5.2f}x cp")
        impact = asyncio.run(guest_impact(src, tgt, size, 2.0))
        print("guest impact: 4 KiB random writes, QD16, in-process, unlimited full backup")
        base, during = impact["base_rate"], impact["job_rate"]
        print(f"  without backup: {base:8.0f} writes/s  p99 {impact['base_p99']:.2f} ms")
        print(
            f"  during backup:  {during:8.0f} writes/s  p99 {impact['job_p99']:.2f} ms"
            f"  (backup took {impact['job_seconds']:.1f} s)"
        )
        print(
            f"  rate ratio {impact['job_rate'] / impact['base_rate']:.2f}x (goal >= 0.5x), "
            f"p99 ratio {impact['job_p99'] / impact['base_p99']:.1f}x (goal <= 10x)"
        )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
