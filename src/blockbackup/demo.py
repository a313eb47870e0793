"""The built-in demo: a live backup of a disk image while it is being written.

1. Creates a sample raw image (random data with holes, like a real disk).
2. Starts a writer doing 4 KiB random writes at queue depth 16, and keeps it running.
3. Starts a full backup. At T0 (inside the quiesced section) it makes an independent
   reference copy of the source file with ``copy_file_range``.
4. When the job completes, compares the backup with the reference (SHA-256) and prints
   the backup throughput and the writer's rate and p99 latency before and during the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from blockbackup._aio import run_blocking
from blockbackup.api import BlockBackup
from blockbackup.block.copy_range import copy_file_range_all
from blockbackup.block.node import BlockNode

MiB = 1 << 20


def _make_sample(path: Path, size: int) -> int:
    """Random data in 1 MiB pieces on about 60% of the image; the rest holes."""
    rng = random.Random(0)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, MiB):
            if rng.random() < 0.6:
                f.seek(offset)
                piece = os.urandom(min(MiB, size - offset))
                f.write(piece)
                written += len(piece)
    return written


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_reference(src: Path, dst: Path, size: int) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        d.truncate(size)
        copy_file_range_all(s.fileno(), 0, d.fileno(), 0, size)


class Writer:
    """4 KiB random writes at a fixed queue depth, with per-write latencies."""

    def __init__(self, node: BlockNode, depth: int = 16) -> None:
        self.node = node
        self.depth = depth
        self.latencies: list[tuple[float, float]] = []  # (start time, latency)
        self._stop = asyncio.Event()

    async def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        blocks = self.node.size // 4096
        data = os.urandom(4096)
        while not self._stop.is_set():
            start = time.perf_counter()
            await self.node.write(rng.randrange(blocks) * 4096, data)
            self.latencies.append((start, time.perf_counter() - start))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self.depth):
                tg.create_task(self._worker(i))

    def stop(self) -> None:
        self._stop.set()

    def stats(self, since: float, until: float) -> tuple[float, float]:
        """(writes per second, p99 latency in ms) of writes started in [since, until)."""
        lat = sorted(t for s, t in self.latencies if since <= s < until)
        if not lat or until <= since:
            return 0.0, 0.0
        return len(lat) / (until - since), lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000


async def run_demo(size: int, directory: str | None, speed: int, keep: bool) -> int:
    work = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="blockbackup-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    src, tgt, ref = work / "disk.img", work / "backup.img", work / "reference-at-t0.img"
    try:
        data = await run_blocking(_make_sample, src, size)
        with open(tgt, "wb") as f:
            f.truncate(size)
        print(f"sample image {src}: {size / MiB:.0f} MiB, {data / MiB:.0f} MiB of data")
        async with BlockBackup() as bb:
            disk = await bb.blockdev_add(
                {
                    "driver": "raw",
                    "node-name": "disk",
                    "file": {"driver": "file", "filename": str(src)},
                }
            )
            await bb.blockdev_add(
                {
                    "driver": "raw",
                    "node-name": "backup",
                    "file": {"driver": "file", "filename": str(tgt)},
                }
            )
            writer = Writer(disk)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(writer.run())
                await asyncio.sleep(1.0)  # the writer's rate without a backup

                async def reference_copy() -> None:
                    await run_blocking(_copy_reference, src, ref, size)

                t_ref = time.perf_counter()
                job = await bb.backup(
                    "disk", "backup", sync="full", speed=speed, at_point_in_time=reference_copy
                )
                t0 = time.perf_counter()
                await bb.wait(job)
                t1 = time.perf_counter()
                await asyncio.sleep(min(1.0, t1 - t0))
                writer.stop()
            base_rate, base_p99 = writer.stats(t_ref - 1.0, t_ref)
            job_rate, job_p99 = writer.stats(t0, t1)
        same = await run_blocking(_sha256, tgt) == await run_blocking(_sha256, ref)
        secs = t1 - t0
        print(
            f"backup: {size / MiB:.0f} MiB in {secs:.2f} s = {size / MiB / secs:.0f} MiB/s "
            f"(virtual size; {data / MiB / secs:.0f} MiB/s of data)"
        )
        print(f"writer without backup: {base_rate:,.0f} writes/s, p99 {base_p99:.2f} ms")
        print(f"writer during backup:  {job_rate:,.0f} writes/s, p99 {job_p99:.2f} ms")
        print(f"writes during the job: {sum(1 for s, _ in writer.latencies if t0 <= s < t1):,}")
        print(f"backup allocated {os.stat(tgt).st_blocks * 512 / MiB:.0f} MiB (sparse target)")
        if same:
            print("OK: the backup equals the image at the moment the backup started")
            return 0
        print("FAILED: the backup differs from the image at T0")
        return 1
    finally:
        if not keep and directory is None:
            shutil.rmtree(work, ignore_errors=True)
