"""Cost follows data: a 4 TiB sparse disk with 64 MiB of data backs up like 64 MiB would.

Runs the backup in a child process so that its peak RSS is its own. Asserts sizes and
memory, never time (the duration is printed for the record).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TiB = 1 << 40
MiB = 1 << 20

CHILD = r"""
import asyncio, json, os, sys, time
from blockbackup.api import BlockBackup

async def main(src, tgt):
    async with BlockBackup() as bb:
        await bb.blockdev_add({"driver": "raw", "node-name": "src",
                               "file": {"driver": "file", "filename": src}})
        await bb.blockdev_add({"driver": "raw", "node-name": "tgt",
                               "file": {"driver": "file", "filename": tgt}})
        start = time.perf_counter()
        job = await bb.backup("src", "tgt")
        await bb.wait(job)
        seconds = time.perf_counter() - start
        total = job.progress_total
    # VmHWM, not ru_maxrss: a child spawned by vfork inherits the parent's peak in
    # ru_maxrss (the pytest process's, after whatever ran before), VmHWM is its own.
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    rss = int(hwm.split()[1]) * 1024
    print(json.dumps({"seconds": seconds, "rss": rss, "total": total}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
def test_sparse_4tib_backup_costs_what_its_data_costs(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    pieces = {}
    with open(src, "wb") as f:
        f.truncate(4 * TiB)
        for i in range(64):  # 64 x 1 MiB spread over the whole disk
            offset = i * (4 * TiB // 64) + (i * 7919 % 1024) * 4096
            pieces[offset] = os.urandom(MiB)
            f.seek(offset)
            f.write(pieces[offset])
    with open(tgt, "wb") as f:
        f.truncate(4 * TiB)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(tgt)],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"4 TiB sparse backup: {result['seconds']:.2f} s, peak RSS {result['rss'] / MiB:.0f} MiB")
    assert result["total"] == 4 * TiB
    assert result["rss"] < 200 * MiB
    allocated = os.stat(tgt).st_blocks * 512
    assert 64 * MiB <= allocated <= 72 * MiB  # the data, plus at most a few MiB
    fd = os.open(tgt, os.O_RDONLY)
    try:
        for offset, data in pieces.items():
            assert os.pread(fd, MiB, offset) == data
            # the target's holes are where the source's are, to the backup's 64 KiB cluster
            cluster_end = -(-(offset + MiB) // (64 * 1024)) * 64 * 1024
            assert offset + MiB <= os.lseek(fd, offset, os.SEEK_HOLE) <= cluster_end
    finally:
        os.close(fd)


def test_scattered_small_extents_stay_sparse_and_exact(tmp_path: Path) -> None:
    """A disk of small data extents between holes (the chunk spans both): the target holds
    exactly the source, and no more than its data clusters are allocated."""
    import random

    grain = 64 * 1024
    size = 256 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    rng = random.Random(3)
    chosen = sorted(rng.sample(range(size // grain), size // grain // 4))
    with open(src, "wb") as f:
        f.truncate(size)
        for g in chosen:
            f.seek(g * grain)
            # Some grains are data that reads as zeroes: never written to the target.
            f.write(bytes(grain) if g % 7 == 0 else os.urandom(grain))
    with open(tgt, "wb") as f:
        f.truncate(size)
    subprocess.run([sys.executable, "-c", CHILD, str(src), str(tgt)], check=True, timeout=120)
    assert src.read_bytes() == tgt.read_bytes()
    data_grains = sum(1 for g in chosen if g % 7)
    allocated = os.stat(tgt).st_blocks * 512
    assert allocated <= data_grains * grain + MiB
