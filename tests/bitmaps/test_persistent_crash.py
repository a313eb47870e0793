"""Crash safety of persistent bitmaps: a child writes randomly (raw and qcow2) and is
SIGKILLed at a random moment; after reopening, the bitmap is a superset of every write the
child issued, and an incremental backup with it over the previous backup equals the image.

Both layouts people write: the format node with its file child inline, and a file node
added first and named by reference (``--blockdev driver=file,node-name=src-file,...
--blockdev driver=raw,file=src-file``), where the format node takes the file node's sidecar.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockbackup.api import BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.block.node import BlockNode

pytestmark = [pytest.mark.timeout(120)]

SIZE = 8 << 20
GRAN = 65536

CHILD = r"""
import asyncio, os, random, sys
from blockbackup.api import BlockBackup

async def main(fmt, path, seed, layout):
    rnd = random.Random(seed)
    out = sys.stdout
    bb = BlockBackup()
    if layout == "ref":
        await bb.blockdev_add({"driver": "file", "node-name": "src-file", "filename": path})
        node = await bb.blockdev_add({"driver": fmt, "node-name": "src", "file": "src-file"})
    else:
        file = {"driver": "file", "filename": path}
        node = await bb.blockdev_add({"driver": fmt, "node-name": "src", "file": file})
    out.write("ready\n"); out.flush()
    async def worker(w):
        while True:
            off = rnd.randrange(0, node.size - 1)
            n = min(rnd.choice([512, 4096, 4096, 65536, 200000]), node.size - off)
            out.write(f"{w} {off} {n}\n"); out.flush()  # logged before it is issued
            await node.write(off, os.urandom(n))
    await asyncio.gather(*(worker(w) for w in range(8)))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


def _image(tmp: Path, fmt: str) -> Path:
    path = tmp / f"src.{fmt}"
    if fmt == "raw":
        path.write_bytes(os.urandom(SIZE))
    else:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True
        )
    return path


def _opts(fmt: str, name: str, path: Path) -> dict[str, object]:
    return {"driver": fmt, "node-name": name, "file": {"driver": "file", "filename": str(path)}}


async def _read_all(bb: BlockBackup, name: str) -> bytes:
    node = bb.graph.get(name)
    return bytes(await node.read(0, node.size))


async def _add_src(bb: BlockBackup, fmt: str, path: Path, layout: str) -> BlockNode:
    if layout == "ref":
        await bb.blockdev_add({"driver": "file", "node-name": "src-file", "filename": str(path)})
        return await bb.blockdev_add({"driver": fmt, "node-name": "src", "file": "src-file"})
    return await bb.blockdev_add(_opts(fmt, "src", path))


def _run_child(
    fmt: str, path: Path, seed: int, rnd: random.Random, layout: str
) -> list[tuple[int, int, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, fmt, str(path), str(seed), layout],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    time.sleep(rnd.uniform(0.05, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with proc.stdout:
        lines = proc.stdout.read().splitlines()
    writes = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            writes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return writes


@pytest.mark.parametrize("layout", ["inline", "ref"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_sigkill_under_writes_keeps_a_superset(tmp_path: Path, fmt: str, layout: str) -> None:
    seed = int(os.environ.get("BB_CRASH_SEED", "1234"))
    rnd = random.Random(seed)
    src = _image(tmp_path, fmt)
    backup = tmp_path / "backup.raw"

    async def setup() -> None:
        async with BlockBackup() as bb:
            await _add_src(bb, fmt, src, layout)
            bitmaps_of(bb.graph.get("src")).create("b0", GRAN, persistent=True)
            backup.write_bytes(await _read_all(bb, "src"))  # the full backup at creation

    asyncio.run(setup())
    total = 0
    for round_ in range(3):
        writes = _run_child(fmt, src, seed * 10 + round_, rnd, layout)
        total += len(writes)

        async def check(round_: int, writes: list[tuple[int, int, int]]) -> None:
            async with BlockBackup() as bb:
                node = await _add_src(bb, fmt, src, layout)
                bm = bitmaps_of(node).get("b0")
                assert bm is not None
                assert not bm.inconsistent
                assert bm.persistent
                image = await _read_all(bb, "src")
                before = backup.read_bytes()
                # A write logged by the child may have been killed before it was issued (the
                # last one of each worker): its granules may be clean, but then its data
                # must not have reached the image.
                last = {w: i for i, (w, _, _) in enumerate(writes)}
                for i, (w, off, n) in enumerate(writes):
                    for g in range(off // GRAN, (off + n - 1) // GRAN + 1):
                        if bm.bitmap.get(g * GRAN):
                            continue
                        assert i == last[w], f"round {round_}: granule {g} lost"
                        span = slice(g * GRAN, (g + 1) * GRAN)
                        assert image[span] == before[span], f"round {round_}: {g} lost"
                await bb.blockdev_add(_opts("raw", "tgt", backup))
                job = await bb.backup("src", "tgt", sync="incremental", bitmap="b0")
                await bb.wait(job)
            assert backup.read_bytes() == image, f"round {round_}: backup differs"

        asyncio.run(check(round_, writes))
    assert total > 20
    if fmt == "qcow2":
        res = subprocess.run(["qemu-img", "check", str(src)], capture_output=True, text=True)
        assert res.returncode in (0, 3), res.stdout + res.stderr  # leaks allowed after a crash
