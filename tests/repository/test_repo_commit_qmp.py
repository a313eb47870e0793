"""``x-bb-repo-commit`` driven with QEMU's own QMP client against the daemon: one manifest
for several target nodes after their jobs, and every refusal (which commits nothing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from blockbackup.repository.repo import Repository
from testkit.daemon_proc import DaemonProcess, daemon_process
from testkit.repo import read_disk

pytestmark = [pytest.mark.asyncio]
MiB = 1 << 20


def target(name: str, repo: Path, disk: str, size: int) -> dict[str, Any]:
    return {
        "driver": "bb-repo-target",
        "node-name": name,
        "repository": str(repo),
        "disk": disk,
        "size": size,
        "key-secret": "k",
    }


async def setup(d: DaemonProcess, tmp_path: Path, sizes: list[int]) -> list[bytes]:
    """Images img<i> as raw nodes d<i>, the secret k, and a target t<i> for each."""
    datas = []
    await d.cmd("object-add", {"qom-type": "secret", "id": "k", "data": "cHc=", "format": "base64"})
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        (tmp_path / f"img{i}").write_bytes(data)
        datas.append(data)
        await d.cmd(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": f"d{i}",
                "file": {"driver": "file", "filename": str(tmp_path / f"img{i}")},
            },
        )
        await d.cmd("blockdev-add", target(f"t{i}", tmp_path / "repo", f"disk{i}", size))
    return datas


async def refused(d: DaemonProcess, args: dict[str, Any]) -> str:
    with pytest.raises(ExecuteError) as info:
        await d.cmd("x-bb-repo-commit", args)
    return str(info.value)


async def test_one_manifest_for_two_nodes_and_refusals(tmp_path: Path) -> None:
    Repository.init(str(tmp_path / "repo"), b"pw")
    async with daemon_process(tmp_path, []) as d:
        datas = await setup(d, tmp_path, [4 * MiB, 2 * MiB])
        await d.cmd("blockdev-add", {"driver": "null-co", "node-name": "null", "size": MiB})

        assert "Cannot find device='nope'" in await refused(d, {"nodes": ["nope"]})
        assert "'null' is not a bb-repo-target node" in await refused(d, {"nodes": ["null"]})
        assert "has not been flushed" in await refused(d, {"nodes": ["t0"]})
        assert "at least one" in await refused(d, {"nodes": []})
        assert "twice" in await refused(d, {"nodes": ["t0", "t0"]})
        text = await refused(d, {"nodes": ["t0"], "sources": {"t9": {}}})
        assert "not in 'nodes'" in text

        # a job still running (slowed down) is refused, named
        await d.cmd(
            "transaction",
            {
                "actions": [
                    {
                        "type": "blockdev-backup",
                        "data": {"job-id": f"j{i}", "device": f"d{i}", "target": f"t{i}",
                                 "sync": "full", "speed": 1 if i == 0 else 0,
                                 "auto-dismiss": False},
                    }
                    for i in range(2)
                ]
            },
        )  # fmt: skip
        await d.event("JOB_STATUS_CHANGE", id="j1", status="concluded", timeout=60)
        text = await refused(d, {"nodes": ["t0", "t1"]})
        assert "still written by job 'j0'" in text
        await d.cmd("block-job-set-speed", {"device": "j0", "speed": 0})
        await d.event("JOB_STATUS_CHANGE", id="j0", status="concluded", timeout=60)
        assert Repository.open(str(tmp_path / "repo"), b"pw").snapshot_ids() == []

        text = await refused(d, {"nodes": ["t0"], "sources": {"t0": {"read-from": "x@1"}}})
        assert "incrementally but started from no snapshot" in text
        got = await d.cmd(
            "x-bb-repo-commit",
            {
                "nodes": ["t0", "t1"],
                "tags": {"why": "test"},
                "sources": {"t0": {"node": "d0", "base": "a lie"}},
            },
        )
        assert [disk["disk"] for disk in got["disks"]] == ["disk0", "disk1"]
        assert got["disks"][0]["stored-chunks"] > 0
    repo = Repository.open(str(tmp_path / "repo"), b"pw")
    (snapshot,) = repo.snapshots()
    assert snapshot.id == got["snapshot"]
    assert snapshot.tags == {"why": "test"}
    assert [disk.name for disk in snapshot.disks] == ["disk0", "disk1"]
    assert snapshot.disks[0].source == {"base": "none", "node": "d0"}
    for record, data in zip(snapshot.disks, datas, strict=True):
        assert read_disk(repo, record) == data


async def test_a_failed_job_is_not_committed(tmp_path: Path) -> None:
    """A job that failed (blkdebug EIO on the source) leaves its target uncommittable, even
    though the node itself was flushed by an earlier, successful job."""
    Repository.init(str(tmp_path / "repo"), b"pw")
    async with daemon_process(tmp_path, []) as d:
        await setup(d, tmp_path, [MiB])
        await d.cmd(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "bad",
                "file": {
                    "driver": "blkdebug",
                    "inject-error": [{"event": "read_aio", "errno": 5}],
                    "image": {"driver": "file", "filename": str(tmp_path / "img0")},
                },
            },
        )
        await d.cmd("blockdev-backup", {"job-id": "ok", "device": "d0", "target": "t0",
                                         "sync": "full", "auto-dismiss": False})  # fmt: skip
        await d.event("JOB_STATUS_CHANGE", id="ok", status="concluded", timeout=60)
        await d.cmd("job-dismiss", {"id": "ok"})
        await d.cmd("blockdev-backup", {"job-id": "bad", "device": "bad", "target": "t0",
                                         "sync": "full", "auto-dismiss": False})  # fmt: skip
        await d.event("JOB_STATUS_CHANGE", id="bad", status="concluded", timeout=60)
        text = await refused(d, {"nodes": ["t0"]})
        assert "did not succeed" in text
    assert Repository.open(str(tmp_path / "repo"), b"pw").snapshot_ids() == []
