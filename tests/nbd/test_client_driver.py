"""The ``nbd`` block driver: a remote export as a node, against qemu-nbd and our server.

Why: backups read from and write to remote exports through this driver; it must copy
exactly, report holes from ``base:allocation`` and pass write-zeroes/trim through.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from blockbackup.block.driver import Status, WriteFlags
from blockbackup.block.graph import Graph
from blockbackup.errors import BlockBackupError
from nbd.nbd_kit import MiB, need, server_env

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


async def _copy(graph: Graph, src: str, dst: str) -> None:
    s, d = graph.get(src), graph.get(dst)
    chunk = 1 * MiB
    pos = 0
    while pos < s.size:
        ext = await s.block_status(pos, s.size - pos)
        n = min(ext.length, chunk)
        if ext.status & Status.ZERO:
            await d.write_zeroes(pos, n, WriteFlags.MAY_UNMAP)
        else:
            await d.write(pos, await s.read(pos, n))
        pos += n


async def test_driver_against_our_server_copy_and_ops() -> None:
    async with server_env(4 * MiB) as env:
        data = os.urandom(MiB)
        await env.node.write(MiB, data)
        graph = Graph()
        target = env.dir / "copy.raw"
        with open(target, "wb") as f:
            f.truncate(4 * MiB)
        try:
            remote = await graph.add(
                {
                    "driver": "nbd",
                    "node-name": "remote",
                    "server": {"type": "unix", "path": env.sock},
                    "export": "src",
                    "reconnect-delay": 0,
                }
            )
            assert remote.size == 4 * MiB
            assert remote.limits.max_transfer == 32 * MiB
            ext = await remote.block_status(0, 4 * MiB)
            assert ext.status & Status.ZERO
            assert ext.length == MiB
            ext = await remote.block_status(MiB, 3 * MiB)
            assert ext.status & Status.DATA
            await graph.add(
                {
                    "driver": "raw",
                    "node-name": "dst",
                    "file": {"driver": "file", "filename": str(target)},
                }
            )
            await _copy(graph, "remote", "dst")
            assert target.read_bytes() == env.image.read_bytes()
            # Writes, zeroes and trims go to the remote node through its request layer.
            await remote.write(0, b"\x42" * 8192, WriteFlags.FUA)
            await remote.write_zeroes(MiB, 65536, WriteFlags.NONE)
            await remote.discard(2 * MiB, 65536)
            await remote.flush()
            assert bytes(await env.node.read(0, 8192)) == b"\x42" * 8192
            assert bytes(await env.node.read(MiB, 65536)) == bytes(65536)
            try:  # fast zero: either done by fallocate or refused with ENOTSUP
                await remote.write_zeroes(0, 4096, WriteFlags.NO_FALLBACK)
                assert bytes(await env.node.read(0, 4096)) == bytes(4096)
            except OSError as exc:
                assert exc.errno == errno.ENOTSUP  # noqa: PT017
        finally:
            await graph.aclose()


async def test_driver_unknown_export() -> None:
    async with server_env() as env:
        graph = Graph()
        with pytest.raises(BlockBackupError, match="not available"):
            await graph.add(
                {
                    "driver": "nbd",
                    "node-name": "r",
                    "server": {"type": "unix", "path": env.sock},
                    "export": "nosuch",
                }
            )


async def test_driver_reconnects() -> None:
    async with server_env() as env:
        await env.node.write(0, b"\x01" * 4096)
        graph = Graph()
        try:
            remote = await graph.add(
                {
                    "driver": "nbd",
                    "node-name": "r",
                    "server": {"type": "unix", "path": env.sock},
                    "export": "src",
                    "reconnect-delay": 5,
                }
            )
            env.exports.delete("e", "hard")
            await asyncio.sleep(0.05)
            env.exports.add("e", "src", name="src", writable=True)
            assert bytes(await remote.read(0, 4096)) == b"\x01" * 4096
        finally:
            await graph.aclose()


@need("qemu-nbd")
@pytest.mark.qemu
async def test_driver_copies_from_qemu_nbd() -> None:
    d = Path(tempfile.mkdtemp(prefix="bbqn", dir="/tmp"))
    try:
        image = d / "q.raw"
        payload = os.urandom(MiB)
        with open(image, "wb") as f:
            f.truncate(4 * MiB)
            f.seek(2 * MiB)
            f.write(payload)
        sock = str(d / "q.sock")
        proc = await asyncio.create_subprocess_exec(
            "qemu-nbd", "--socket", sock, "--format=raw", "--export-name=disk",
            "--persistent", "--shared=4", str(image),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):
                if os.path.exists(sock):  # noqa: ASYNC240
                    break
                await asyncio.sleep(0.05)
            graph = Graph()
            target = d / "copy.raw"
            with open(target, "wb") as f:
                f.truncate(4 * MiB)
            try:
                await graph.add(
                    {
                        "driver": "nbd",
                        "node-name": "remote",
                        "server": {"type": "unix", "path": sock},
                        "export": "disk",
                    }
                )
                await graph.add(
                    {
                        "driver": "raw",
                        "node-name": "dst",
                        "file": {"driver": "file", "filename": str(target)},
                    }
                )
                ext = await graph.get("remote").block_status(0, 4 * MiB)
                assert ext.status & Status.ZERO
                await _copy(graph, "remote", "dst")
                assert target.read_bytes() == image.read_bytes()
            finally:
                await graph.aclose()
        finally:
            proc.terminate()
            await proc.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)
