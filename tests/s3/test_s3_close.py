"""A daemon's repository nodes give back their S3 connections when they close.

Why: a daemon runs for months and opens a repository for every backup target and every
snapshot it serves; each ``s3://`` one holds a pool of connections (and threads) to the
server. Closed only by the garbage collector, they piled up on both ends for some time
after every job, and a test saw the sockets as ResourceWarnings. The garbage collector
is off here, so only an explicit close can hang them up.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockbackup.api import BlockBackup
from blockbackup.errors import BlockBackupError
from blockbackup.repository import drivers
from testkit.faultproxy import FaultProxy
from testkit.repocli import bb

MiB = 1 << 20


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _raw(name: str, path: Path, **extra: object) -> dict[str, object]:
    return {
        "driver": "raw",
        "node-name": name,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }


async def _all_hung_up(proxy: FaultProxy) -> int:
    """The proxy's open client connections, once they reached 0 or after 10 s."""
    for _ in range(200):
        if proxy.connections == 0:
            break
        await asyncio.sleep(0.05)
    return proxy.connections


@pytest.mark.asyncio
async def test_repository_nodes_hang_up_when_they_close(
    tmp_path: Path,
    env: dict[str, str],
    bucket: str,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    no_gc: None,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    repo = f"s3://{bucket}/daemon"
    bb("repo", "init", repo, "--passphrase-env", "BBP", env=env)
    image = tmp_path / "disk0.img"
    content = os.urandom(4 * MiB)
    image.write_bytes(content)
    bb("backup", image, "--repo", repo, "--passphrase-env", "BBP", env=env)
    snapshot = {"driver": "bb-repo-snapshot", "node-name": "snap", "repository": repo}
    snapshot |= {"key-secret": "k", "read-only": True}
    assert await _all_hung_up(proxy) == 0
    assert drivers.RepoSnapshotDriver.driver_name == snapshot["driver"]  # registered

    for round_ in range(2):
        out = tmp_path / f"out{round_}.img"
        with open(out, "wb") as f:
            f.truncate(len(content))
        async with BlockBackup() as b:  # a restore through a snapshot node
            b.object_add({"qom-type": "secret", "id": "k", "data": env["BBP"]})
            await b.blockdev_add(snapshot)
            await b.blockdev_add(_raw("out", out))
            await b.wait(await b.backup("snap", "out", sync="full"))
            assert proxy.connections > 0
        assert out.read_bytes() == content
        assert await _all_hung_up(proxy) == 0

        async with BlockBackup() as b:  # a backup into a target node
            b.object_add({"qom-type": "secret", "id": "k", "data": env["BBP"]})
            await b.blockdev_add(_raw("src", image, **{"read-only": True}))
            target = {"driver": "bb-repo-target", "node-name": "tgt", "repository": repo}
            target |= {"disk": "disk1", "size": len(content), "key-secret": "k"}
            await b.blockdev_add(target)
            await b.wait(await b.backup("src", "tgt", sync="full"))
        assert await _all_hung_up(proxy) == 0

        async with BlockBackup() as b:  # a node whose opening fails
            b.object_add({"qom-type": "secret", "id": "k", "data": "not the passphrase"})
            with pytest.raises(BlockBackupError, match="passphrase"):
                await b.blockdev_add(snapshot)
        assert await _all_hung_up(proxy) == 0
