"""Differential scenarios: a copy-before-write target behind a ``throttle`` node.

Why: the limit of a throttle node that is a copy-before-write target must pace the copy
a guest write waits for, on every path (the NBD server's inline path for small cached
writes, the awaited one otherwise), so that ``cbw-timeout`` and ``on-cbw-error`` decide
what the guest sees, as in qemu-storage-daemon 7.2. The outcomes compared (qemu-io's
verdicts, the images) do not depend on timing: at 1 MiB/s a 4 MiB copy, paced in 1 MiB
chunks, cannot finish within a one-second timeout; a bucket filled with 4 MiB at
256 KiB/s holds any further request for about 15 s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from compat.compat_kit import Recorder, env_ok
from compat.test_fleecing_scenarios import run, start_nbd, tool, uri

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.asyncio,
    pytest.mark.skipif(
        not env_ok() or shutil.which("qemu-io") is None, reason="QEMU tools not installed"
    ),
    pytest.mark.timeout(90),
]

MiB = 1 << 20


async def throttled_target(r: Recorder, bps_write: int) -> None:
    """``thr``: a throttle node (group ``g``, ``bps_write``) over a raw ``tmp.img``."""
    await r.cmd(
        "object-add", {"qom-type": "throttle-group", "id": "g", "limits": {"bps-write": bps_write}}
    )
    await r.cmd(
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "tmp",
            "file": {"driver": "file", "filename": str(r.dir / "tmp.img")},
        },
    )
    await r.cmd(
        "blockdev-add",
        {"driver": "throttle", "node-name": "thr", "throttle-group": "g", "file": "tmp"},
    )
    await start_nbd(r)


async def fleece_over(r: Recorder, mode: str) -> None:
    """cbw (src -> thr, 1 s timeout, ``mode``), acc; exports ``guest`` and ``snap``."""
    await r.cmd(
        "blockdev-add",
        {
            "driver": "copy-before-write",
            "node-name": "cbw",
            "file": "src",
            "target": "thr",
            "cbw-timeout": 1,
            "on-cbw-error": mode,
        },
    )
    await r.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
    await r.cmd(
        "block-export-add",
        {"type": "nbd", "id": "eg", "node-name": "cbw", "name": "guest", "writable": True},
    )
    await r.cmd("block-export-add", {"type": "nbd", "id": "es", "node-name": "acc", "name": "snap"})


async def note_guest_vs_t0(r: Recorder) -> None:
    r.note(await tool("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(r, "guest"),
                      str(r.dir / "t0.img")))  # fmt: skip


@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
async def test_large_guest_write_paced_by_throttled_target(tmp_path: Path, mode: str) -> None:
    async def scenario(r: Recorder) -> None:
        await throttled_target(r, MiB)
        await fleece_over(r, mode)
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x55 0 4M"))
        r.note(await tool("qemu-io", "-r", "-f", "raw", uri(r, "snap"), "-c", "read 0 64k"))
        await note_guest_vs_t0(r)

    await run(tmp_path, scenario)


async def test_small_inline_write_waits_for_full_bucket(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        await throttled_target(r, 256 * 1024)
        # Fill the bucket through an export of the throttle node itself.
        await r.cmd(
            "block-export-add",
            {"type": "nbd", "id": "et", "node-name": "thr", "name": "thr", "writable": True},
        )
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "thr"), "-c", "write 0 4M"))
        await r.cmd("block-export-del", {"id": "et"})
        await r.wait_event("BLOCK_EXPORT_DELETED", id="et")
        await fleece_over(r, "break-guest-write")
        # Warm the page cache so the server may try the write inline.
        r.note(await tool("qemu-io", "-r", "-f", "raw", uri(r, "guest"), "-c", "read 1M 64k"))
        r.note(await tool("qemu-io", "-f", "raw", uri(r, "guest"), "-c", "write -P 0x66 1M 4k"))
        r.note(await tool("qemu-io", "-r", "-f", "raw", uri(r, "snap"), "-c", "read 1M 64k"))
        await note_guest_vs_t0(r)

    await run(tmp_path, scenario)
