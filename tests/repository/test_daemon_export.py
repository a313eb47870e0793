"""A snapshot served by the daemon: blockdev-add of a bb-repo-snapshot node over QMP and an
NBD export of it, read by qemu-img (what ``mount`` will be)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from blockbackup.repository.repo import Repository
from testkit.daemon_proc import daemon_process
from testkit.repo import store_disk

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img"),
]
MiB = 1 << 20


async def test_snapshot_exported_over_nbd(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), b"pw")
    data = bytearray(os.urandom(4 * MiB))
    data[MiB : 2 * MiB] = bytes(MiB)
    repo.commit([store_disk(repo, "disk0", bytes(data))])
    (tmp_path / "key").write_bytes(b"pw")
    sock = tmp_path / "nbd.sock"
    async with daemon_process(tmp_path, []) as d:
        await d.cmd("object-add", {"qom-type": "secret", "id": "k", "file": str(tmp_path / "key")})
        await d.cmd(
            "blockdev-add",
            {
                "driver": "bb-repo-snapshot",
                "node-name": "snap",
                "repository": str(tmp_path / "repo"),
                "snapshot": "latest",
                "disk": "disk0",
                "key-secret": "k",
                "read-only": True,
            },
        )
        await d.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        await d.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "snap"})
        uri = f"nbd+unix:///snap?socket={sock}"
        out = tmp_path / "out.img"
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)
        )
        assert await proc.wait() == 0
        listing = await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "map", "--output=json", "-f", "raw", uri],
            capture_output=True,
            text=True,
            check=True,
        )
        await d.cmd("block-export-del", {"id": "e"})
    assert out.read_bytes() == bytes(data)
    zero = [(e["start"], e["length"]) for e in json.loads(listing.stdout) if e["zero"]]
    assert zero == [(MiB, MiB)]  # block status of the zero entries, seen over NBD
