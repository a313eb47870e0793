"""The "second backup with a dirty bitmap" case of ``repo_vs_restic.py``, in a process of its own.

Run by the benchmark as a child process (so its peak RSS is its own): a graph with the image
as a node and a dirty bitmap on it (created right after the first backup, so it starts
clean), the changes written through the node (recorded by the bitmap, as a guest's writes
would be), then the timed part: a ``bb-repo-target`` node whose base is the latest snapshot,
a ``sync=incremental`` backup job with the bitmap into it, and ``Repository.commit``. This is
the library path the live CLI backup (``backup --connect ... --repo``) runs in a daemon.

Prints one JSON line: seconds and CPU seconds (timed part, all threads), stored bytes and
chunks, the snapshot id.

Usage (the passphrase in ``$BB_PASSPHRASE``)::

    python benchmarks/_repo_bitmap.py REPO IMAGE CHANGES.json
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from typing import Any

from blockbackup.api import BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.jobs.backup import BackupPerf
from blockbackup.repository import drivers

CHUNK = 64 * 1024


async def main(repo: str, image: str, changes: list[list[int]]) -> dict[str, Any]:
    passphrase = os.environ["BB_PASSPHRASE"]
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": passphrase})
        src = await bb.blockdev_add(
            {"driver": "raw", "node-name": "src", "file": {"driver": "file", "filename": image}}
        )
        bitmaps_of(src).create("b0", CHUNK)
        for offset, length, seed in changes:
            await src.write(offset, _data(length, seed))
        await src.flush()
        start, cpu = time.perf_counter(), time.process_time()
        node = await bb.blockdev_add(
            {
                "driver": "bb-repo-target",
                "node-name": "t",
                "repository": repo,
                "disk": os.path.basename(image),
                "size": src.size,
                "key-secret": "k",
                "base": "latest",
            }
        )
        driver = node.driver
        assert isinstance(driver, drivers.RepoTargetDriver)
        perf = BackupPerf(cluster_size=CHUNK, max_workers=8)
        job = await bb.backup("src", "t", sync="incremental", bitmap="b0", perf=perf)
        await bb.wait(job)
        assert driver.result is not None
        manifest = await asyncio.to_thread(
            driver.repo.commit, [driver.result.record], None, driver.result.packs
        )
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
        store = driver.repo.store
        return {
            "seconds": seconds,
            "cpu": cpu,
            "snapshot": manifest.id,
            "stored_bytes": store.stored_bytes,
            "stored_chunks": store.stored_blobs,
            "reused_chunks": store.reused_blobs,
        }


def _data(length: int, seed: int) -> bytes:
    """Random bytes, the same for the same seed (restic and borg see the same image)."""
    return random.Random(seed).randbytes(length)


if __name__ == "__main__":
    repo_arg, image_arg, changes_path = sys.argv[1:4]
    with open(changes_path) as f:
        change_list = json.load(f)
    print(json.dumps(asyncio.run(main(repo_arg, image_arg, change_list))))
