"""Crash safety: SIGKILL a writer doing allocating writes (one at a time, or several in
flight at once) and flushes at a random point;
``qemu-img check`` must find no corruption (leaks are allowed) and every write that was
acknowledged before a completed flush must read back."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qcow2_helpers import needs_qemu, run

from blockbackup.block.qcow2.create import create_qcow2_file

pytestmark = [pytest.mark.qemu, needs_qemu]

SLOT = 3000  # bytes per write: unaligned, partial clusters on both ends
SLOTS = 600

WRITER = (
    textwrap.dedent(
        """
    import asyncio, random, sys
    from blockbackup.block.graph import Graph
    from blockbackup.block.driver import WriteFlags

    def payload(i):
        return bytes([(i * 37 + 1) % 256]) * SLOT

    async def one(node, n, i):
        if n % 7 == 3:
            await node.write_zeroes(i * SLOT, SLOT, WriteFlags.MAY_UNMAP)
            await node.write(i * SLOT, payload(i))
        else:
            await node.write(i * SLOT, payload(i))

    async def main(path, batch):
        g = Graph()
        node = await g.add({"driver": "qcow2", "node-name": "q",
                            "file": {"driver": "file", "filename": path}})
        order = list(range(SLOTS))
        random.Random(5).shuffle(order)
        # batch 5: five writes in flight at once (neighbouring slots share clusters),
        # then the flush; batch 1: one at a time. Either way a flush follows n % 5 == 4.
        for start in range(0, SLOTS, batch):
            ns = range(start, min(start + batch, SLOTS))
            await asyncio.gather(*(one(node, n, order[n]) for n in ns))
            n = ns[-1]
            if n % 5 == 4:
                await node.flush()
                print(f"FLUSHED {n}", flush=True)
        print("DONE", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
    )
    .replace("SLOTS", str(SLOTS))
    .replace("SLOT", str(SLOT))
)


def _payload(i: int) -> bytes:
    return bytes([(i * 37 + 1) % 256]) * SLOT


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_during_allocating_writes(tmp_path: Path, seed: int, batch: int) -> None:
    img = tmp_path / "c.qcow2"
    create_qcow2_file(img, 4 << 20, cluster_size=1024)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(img), str(batch)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    target = random.Random(seed).randrange(5, SLOTS // 5 - 5)
    flushed = -1
    seen = 0
    for line in proc.stdout:
        if line.startswith("FLUSHED"):
            flushed = int(line.split()[1])
            seen += 1
            if seen >= target:
                time.sleep(random.Random(seed).random() * 0.01)
                break
        if line.startswith("DONE"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    res = subprocess.run(
        ["qemu-img", "check", str(img)], capture_output=True, text=True, check=False
    )
    assert res.returncode in (0, 3), res.stdout + res.stderr  # 3: leaks only
    assert "ERROR" not in res.stdout, res.stdout
    assert "corrupt" not in res.stdout.lower(), res.stdout
    raw = tmp_path / "c.raw"
    run("qemu-img", "convert", "-O", "raw", img, raw)
    data = raw.read_bytes()
    order = list(range(SLOTS))
    random.Random(5).shuffle(order)
    for i in order[: flushed + 1]:
        assert data[i * SLOT : (i + 1) * SLOT] == _payload(i), f"slot {i} lost"
