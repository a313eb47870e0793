"""The export and server API the QMP commands map onto: errors, lifetime, events, limits.

Why: QMP clients see these texts verbatim, and ``BLOCK_EXPORT_DELETED`` timing is
observable (qemu-storage-daemon 7.2 was checked by hand for safe/hard behaviour).
"""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
from pathlib import Path

import pytest

from blockbackup.block.graph import Graph
from blockbackup.errors import BlockBackupError
from blockbackup.events import EventBus
from blockbackup.nbd.client import NbdClient, NbdConnectError
from blockbackup.nbd.exports import ExportManager
from blockbackup.nbd.server import NbdServer
from nbd.nbd_kit import MiB, server_env

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_errors_before_and_after_start() -> None:
    graph = Graph()
    await graph.add({"driver": "null-co", "node-name": "n", "size": MiB})
    exports = ExportManager(graph, EventBus())
    with pytest.raises(BlockBackupError, match=r"^NBD server not running$"):
        exports.add("e", "n")
    with pytest.raises(
        BlockBackupError, match=r"^Cannot find device='nosuch' nor node-name='nosuch'$"
    ):
        exports.add("e", "nosuch")
    server = NbdServer(exports)
    with pytest.raises(BlockBackupError, match=r"^NBD server not running$"):
        await server.stop()
    d = tempfile.mkdtemp(dir="/tmp")
    await server.start({"type": "unix", "data": {"path": f"{d}/s"}})
    try:
        assert stat.S_IMODE(os.stat(f"{d}/s").st_mode) == 0o600
        with pytest.raises(BlockBackupError, match=r"^NBD server already running$"):
            await server.start({"type": "unix", "path": f"{d}/t"})
        exports.add("e", "n")
        with pytest.raises(BlockBackupError, match=r"^Block export id 'e' is already in use$"):
            exports.add("e", "n", name="other")
        with pytest.raises(BlockBackupError, match=r"^NBD server already has export named 'n'$"):
            exports.add("e2", "n")
        with pytest.raises(BlockBackupError, match=r"^Export 'nosuch' is not found$"):
            exports.delete("nosuch")
        with pytest.raises(BlockBackupError, match=r"^Bitmap 'b0' is not found$"):
            exports.add("e3", "n", name="x", bitmaps=["b0"])
        with pytest.raises(BlockBackupError, match=r"^Node n is in use$"):
            await graph.delete("n")
        assert exports.query() == [
            {"id": "e", "type": "nbd", "node-name": "n", "shutting-down": False}
        ]
    finally:
        await server.stop()
    assert not Path(d, "s").exists()  # noqa: ASYNC240
    assert exports.query() == []
    await graph.delete("n")
    os.rmdir(d)


async def test_delete_without_clients_emits_event() -> None:
    async with server_env() as env:
        with env.events.subscribe(["BLOCK_EXPORT_DELETED"]) as sub:
            env.exports.delete("e")
            assert [ev["data"] for ev in sub.drain()] == [{"id": "e"}]
        assert env.node.users == {}
        await env.graph.delete("src")


async def test_safe_delete_refuses_while_client_connected_hard_drops() -> None:
    async with server_env() as env:
        client = await NbdClient.connect({"type": "unix", "path": env.sock}, "src")
        try:
            await client.write(0, b"a" * 4096)
            with env.events.subscribe(["BLOCK_EXPORT_DELETED"]) as sub:
                with pytest.raises(BlockBackupError, match=r"^export 'e' still in use$"):
                    env.exports.delete("e")
                env.exports.delete("e", "hard")
                assert env.exports.query()[0]["shutting-down"] in (True,)
                export = env.exports.get("e")
                assert export is not None
                await asyncio.wait_for(export.wait_deleted(), 5)
                assert [ev["data"] for ev in sub.drain()] == [{"id": "e"}]
            with pytest.raises(OSError):  # noqa: PT011
                await client.read(0, 4096)
            with pytest.raises(NbdConnectError, match="not available"):
                await NbdClient.connect({"type": "unix", "path": env.sock}, "src")
        finally:
            await client.close()
        assert env.exports.query() == []


async def test_server_stop_removes_exports_and_clients() -> None:
    async with server_env() as env:
        client = await NbdClient.connect({"type": "unix", "path": env.sock}, "src")
        with env.events.subscribe(["BLOCK_EXPORT_DELETED"]) as sub:
            await env.server.stop()
            await asyncio.sleep(0)
            assert [ev["data"] for ev in sub.drain()] == [{"id": "e"}]
        with pytest.raises(OSError):  # noqa: PT011
            await client.read(0, 512)
        await client.close()


async def test_max_connections() -> None:
    async with server_env(max_connections=1) as env:
        addr = {"type": "unix", "path": env.sock}
        first = await NbdClient.connect(addr, "src")
        with pytest.raises(NbdConnectError):
            await NbdClient.connect(addr, "src", timeout=5)
        await first.close()
        await asyncio.sleep(0.05)
        second = await NbdClient.connect(addr, "src")
        await second.close()


async def test_tcp_listener_loopback() -> None:
    graph = Graph()
    await graph.add({"driver": "null-co", "node-name": "n", "size": MiB, "read-zeroes": True})
    exports = ExportManager(graph, EventBus())
    server = NbdServer(exports)
    await server.start({"type": "inet", "port": "0"})
    try:
        assert server.address is not None
        assert server.address["host"] == "127.0.0.1"
        exports.add("e", "n")
        client = await NbdClient.connect(server.address, "n")
        assert client.read_only
        assert bytes(await client.read(0, 4096)) == bytes(4096)
        with pytest.raises(OSError, match=r"read-only|Operation not permitted"):
            await client.write(0, b"x")
        await client.close()
    finally:
        await server.stop()
        await graph.aclose()


async def test_concurrent_requests_out_of_order() -> None:
    async with server_env(8 * MiB) as env:
        client = await NbdClient.connect({"type": "unix", "path": env.sock}, "src")
        try:
            blobs = [os.urandom(65536) for _ in range(64)]
            await asyncio.gather(*(client.write(i * 65536, b) for i, b in enumerate(blobs)))
            got = await asyncio.gather(*(client.read(i * 65536, 65536) for i in range(64)))
            assert [bytes(g) for g in got] == blobs
            await client.flush()
            await client.write_zeroes(0, 65536, may_trim=True)
            assert bytes(await client.read(0, 65536)) == bytes(65536)
            await client.trim(65536, 65536)
            ext = await client.block_status(0, 8 * MiB)
            assert ext is not None
            assert sum(e.length for e in ext) <= 8 * MiB
        finally:
            await client.close()
