"""A chain of incremental backups into qcow2 images, each backed by the previous one.

The QEMU-world recipe: a full backup into ``full.qcow2`` while a dirty bitmap starts at the
same point in time, then incrementals (``sync=incremental``) into ``inc1.qcow2`` backed by
``full.qcow2``, ``inc2.qcow2`` backed by ``inc1.qcow2``. The source is rewritten between and
during the backups. Each link, read through its backing chain by ``qemu-img compare``, must
equal the source at that backup's T0; each passes ``qemu-img check``; an incremental holds
only the clusters that changed.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

import pytest

from blockbackup.api import BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.block.node import BlockNode
from blockbackup.block.qcow2.create import create_qcow2_file
from testkit.images import make_image, raw_node, read_file

sys.path.insert(0, str(Path(__file__).parent))
from qcow2_helpers import check_clean, needs_qemu, qcow2_opts, run

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu, needs_qemu]
MiB = 1 << 20
SIZE = 8 * MiB
CLUSTER = 65536


async def rewrite(node: BlockNode, rng: random.Random, count: int) -> set[int]:
    """Random 4 KiB writes (some zeroes); the clusters they touched."""
    touched = set()
    for _ in range(count):
        offset = rng.randrange(SIZE // 4096) * 4096
        if rng.random() < 0.2:
            await node.write_zeroes(offset, 4096)
        else:
            await node.write(offset, rng.randbytes(4096))
        touched.add(offset // CLUSTER)
    return touched


async def test_full_then_incremental_chain(tmp_path: Path) -> None:
    rng = random.Random(5)
    src_path = make_image(tmp_path / "src.img", SIZE, [(0, rng.randbytes(6 * MiB))])
    links = [tmp_path / "full.qcow2", tmp_path / "inc1.qcow2", tmp_path / "inc2.qcow2"]
    async with BlockBackup() as bb:
        src = await bb.blockdev_add(raw_node("src", src_path))
        previous: Path | None = None
        touched: set[int] = set()
        for i, link in enumerate(links):
            if previous is None:
                create_qcow2_file(link, SIZE)
            else:
                create_qcow2_file(link, SIZE, backing_file=str(previous), backing_fmt="qcow2")
            await bb.blockdev_add(qcow2_opts(link, f"t{i}"))
            snapshot: list[bytes] = []

            async def at_t0(
                first: bool = previous is None, snapshot: list[bytes] = snapshot
            ) -> None:
                snapshot.append(read_file(src_path))
                if first:  # the bitmap starts at the full backup's point in time
                    bitmaps_of(src).create("b0")

            dirty_at_t0 = set(touched)  # written since the previous T0
            if previous is None:
                job = await bb.backup("src", f"t{i}", sync="full", at_point_in_time=at_t0)
            else:
                job = await bb.backup(
                    "src", f"t{i}", sync="incremental", bitmap="b0", at_point_in_time=at_t0
                )
                # Only the clusters written since the previous T0 are copied.
                assert job.progress_total == len(dirty_at_t0) * CLUSTER
            # the source keeps changing while the job runs (after T0: not in this backup)
            during = asyncio.ensure_future(rewrite(src, rng, 20))
            await bb.wait(job)
            touched = await during
            await bb.graph.delete(f"t{i}")
            (tmp_path / "t0.raw").write_bytes(snapshot[0])
            check_clean(link)
            run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", link, tmp_path / "t0.raw")
            if previous is not None:
                top = json.loads(run("qemu-img", "map", "--output=json", link))
                own = sum(e["length"] for e in top if e["depth"] == 0)
                assert 0 < own <= len(dirty_at_t0) * CLUSTER
            touched |= await rewrite(src, rng, 30)  # between backups
            previous = link
