"""Objects (``object-add``) belong to one graph, not to the process.

Why: the library API and tests make several graphs in one process (two daemons, two
``BlockBackup``s). Each defines its throttle groups, secrets and TLS credentials by id;
the same id in two graphs must not conflict, and ``object-del`` in one must leave the
other's object alone. The TLS case runs real TLS: our NBD server in one daemon, our
``nbd`` block driver in the other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from blockbackup.api import BlockBackup
from blockbackup.daemon import Daemon
from blockbackup.errors import BlockBackupError
from testkit.tls import make_certs

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20


@contextlib.asynccontextmanager
async def two_daemons() -> AsyncIterator[tuple[Daemon, Daemon]]:
    """Two daemons in this process, driven through their command handlers."""
    pair = (Daemon(), Daemon())
    try:
        yield pair
    finally:
        for d in reversed(pair):  # the client of the other first
            await d.jobs.aclose()
            if d.nbd.running:
                await d.nbd.stop()
            else:
                d.exports.close_all()
            await d.graph.aclose()


def throttle_node(name: str, group: str) -> dict[str, Any]:
    return {
        "driver": "throttle",
        "node-name": name,
        "throttle-group": group,
        "file": {"driver": "null-co", "size": MiB},
    }


async def test_throttle_groups_of_two_daemons() -> None:
    async with two_daemons() as (a, b):
        for d, bps in ((a, 1 << 20), (b, 1 << 30)):
            await d.execute(
                "object-add",
                {"qom-type": "throttle-group", "id": "tg0", "limits": {"bps-total": bps}},
            )
            await d.execute("blockdev-add", throttle_node("t", "tg0"))
        group_a = a.graph.objects.throttle_group("tg0")
        group_b = b.graph.objects.throttle_group("tg0")
        assert group_a is not None
        assert group_b is not None
        assert group_a.limits.to_qmp()["bps-total"] == 1 << 20
        assert group_b.limits.to_qmp()["bps-total"] == 1 << 30
        assert (group_a.members, group_b.members) == (1, 1)

        await a.execute("blockdev-del", {"node-name": "t"})
        await a.execute("object-del", {"id": "tg0"})
        # b's group is still there, and still in use by b's node
        with pytest.raises(BlockBackupError, match="'tg0' is in use, can not be deleted"):
            await b.execute("object-del", {"id": "tg0"})
        await b.execute("blockdev-add", throttle_node("t2", "tg0"))
        assert group_b.members == 2
        with pytest.raises(BlockBackupError, match="Throttle group 'tg0' does not exist"):
            await a.execute("blockdev-add", throttle_node("t2", "tg0"))


async def test_secrets_of_two_library_graphs() -> None:
    async with BlockBackup() as one, BlockBackup() as two:
        one.object_add({"qom-type": "secret", "id": "sec0", "data": "one"})
        two.object_add({"qom-type": "secret", "id": "sec0", "data": "two"})
        assert one.graph.objects.secret("sec0").data == b"one"
        one.object_del("sec0")
        assert two.graph.objects.secret("sec0").data == b"two"
        with pytest.raises(BlockBackupError, match="No secret with id 'sec0'"):
            one.graph.objects.secret("sec0")
        with pytest.raises(BlockBackupError, match="duplicate property 'sec0'"):
            two.object_add({"qom-type": "secret", "id": "sec0", "data": "again"})


async def test_tls_credentials_of_two_daemons(tmp_path: Path) -> None:
    """Daemon ``server`` serves over TLS with its ``tls0`` (server endpoint); daemon
    ``client`` reaches it through an ``nbd`` node with its own ``tls0`` (client endpoint)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    if not make_certs(certs):
        pytest.skip("openssl is missing")
    data = os.urandom(MiB)
    image = tmp_path / "src.img"
    image.write_bytes(data)
    sockdir = tempfile.mkdtemp(prefix="bbtls", dir="/tmp")  # unix socket paths are short
    sock = f"{sockdir}/s"

    def creds(endpoint: str) -> dict[str, Any]:
        return {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(certs), "endpoint": endpoint}

    remote = {
        "driver": "nbd",
        "server": {"type": "unix", "path": sock},
        "export": "src",
        "tls-creds": "tls0",
        "tls-hostname": "localhost",
    }
    try:
        async with two_daemons() as (server, client):
            # The client's tls0 first, then the server's: one registry for the whole
            # process would now hand the server's credentials to the client's node.
            await client.execute("object-add", creds("client"))
            await server.execute("object-add", creds("server"))
            await server.execute(
                "blockdev-add",
                {
                    "driver": "raw",
                    "node-name": "src",
                    "file": {"driver": "file", "filename": str(image)},
                },
            )
            await server.execute(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "tls0"},
            )
            await server.execute(
                "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "name": "src"}
            )
            await client.execute("blockdev-add", {**remote, "node-name": "r0"})
            assert await client.graph.get("r0").read(0, MiB) == data

            # Deleting the server's tls0 leaves the client's: a new TLS connection works.
            await server.execute("object-del", {"id": "tls0"})
            await client.execute("blockdev-add", {**remote, "node-name": "r1"})
            assert await client.graph.get("r1").read(0, 4096) == data[:4096]

            # And the client's own delete is seen by the client's next node.
            await client.execute("object-del", {"id": "tls0"})
            with pytest.raises(BlockBackupError, match="No TLS credentials with id 'tls0'"):
                await client.execute("blockdev-add", {**remote, "node-name": "r2"})
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
