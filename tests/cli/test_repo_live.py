"""``blockbackup backup --connect Q DISK... --repo R``: live disks into one repository snapshot,
as a user runs it (the installed ``blockbackup`` against ``blockbackup serve``), with writers
meanwhile, incrementals from checkpoint bitmaps and each way they fall back to a full read,
signals, kills and mistakes. Restores are compared byte for byte with copies taken at T0."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockbackup.demo_e2e import BlockLog, verify, writer
from blockbackup.nbd.client import NbdClient
from blockbackup.repository.repo import Repository
from testkit.backupcli import (
    BLOCKBACKUP,
    MiB,
    Served,
    assert_no_noise,
    bb,
    jobs,
    node_names,
    one_line,
    qmp,
    serving,
    start,
    wait_until,
)

PASS = "the live passphrase"


@pytest.fixture(autouse=True)
def passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BBP", PASS)


def images(tmp_path: Path, sizes: tuple[int, ...] = (8 * MiB, 4 * MiB)) -> list[Path]:
    paths = []
    for i, size in enumerate(sizes):
        data = bytearray(os.urandom(size))
        data[MiB : 2 * MiB] = bytes(MiB)  # a zero run
        path = tmp_path / f"disk{i}.img"
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def init_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    bb("repo", "init", str(repo), "--passphrase-env", "BBP")
    return repo


def live(served: Served, repo: Path, *args: str, check: bool = True) -> dict[str, Any]:
    """``backup --connect Q ARGS --repo R --json``: the result (and stderr under ``_stderr``)."""
    run = bb(
        "backup", "--connect", served.qmp, *args, "--repo", str(repo),
        "--passphrase-env", "BBP", "--json", check=check,
    )  # fmt: skip
    result = dict(json.loads(run.stdout.strip().splitlines()[-1]))
    result["_stderr"] = run.stderr
    result["_code"] = run.returncode
    return result


def restore(repo: Path, spec: str, out: Path) -> bytes:
    bb("restore", "--repo", str(repo), spec, str(out), "--passphrase-env", "BBP")
    return out.read_bytes()


def guest_write(served: Served, node: str, pattern: int, offset: int, length: str) -> None:
    uri = served.uri.replace(f"/{served.exports[0]['node']}?", f"/{node}?")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri],
        check=True,
        capture_output=True,
    )


def checkpoints(served: Served, node: str) -> list[dict[str, Any]]:
    for entry in qmp(served.qmp, "query-named-block-nodes"):
        if entry["node-name"] == node:
            return [b for b in entry.get("dirty-bitmaps", []) if "@" in b.get("name", "")]
    raise AssertionError(node)


def snapshot_ids(repo: Path) -> list[str]:
    return Repository.open(str(repo), PASS.encode()).snapshot_ids()


def assert_clean(served: Served) -> None:
    assert jobs(served.qmp) == []
    assert [n for n in node_names(served.qmp) if n.startswith("bb-")] == []


needs_qemu = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io"),
]


@pytest.mark.asyncio
async def test_two_disks_one_point_in_time_under_writes(tmp_path: Path) -> None:
    """Writers rewrite blocks of both disks with versioned payloads during the backup: each
    block of each restored disk is one exact version, and one T0 explains both disks."""
    paths = images(tmp_path)
    originals = [p.read_bytes() for p in paths]
    repo = init_repo(tmp_path)
    with serving(paths, tmp_path / "run") as served:
        sock = served.uri.split("socket=", 1)[1]
        clients = [
            await NbdClient.connect({"type": "unix", "path": sock}, f"disk{i}") for i in range(2)
        ]
        logs: list[dict[int, BlockLog]] = [{}, {}]
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            for i, client in enumerate(clients):
                for w in range(4):
                    tg.create_task(writer(client, w, len(originals[i]) // 4096, logs[i], stop))
            await asyncio.sleep(0.5)
            proc = await asyncio.create_subprocess_exec(
                BLOCKBACKUP, "backup", "--connect", served.qmp, "disk0", "disk1",
                "--repo", str(repo), "--passphrase-env", "BBP", "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            await asyncio.sleep(0.2)
            stop.set()
        for client in clients:
            await client.close()
        assert proc.returncode == 0, err.decode()
        await asyncio.to_thread(assert_clean, served)
    result = json.loads(out)
    assert result["status"] == "completed"
    assert [d["mode"] for d in result["disks"]] == ["full", "full"]
    windows = []
    for i in range(2):
        restored = restore(repo, f"{result['snapshot']}:disk{i}", tmp_path / f"r{i}.img")
        assert sum(len(log.writes) for log in logs[i].values()) > 0
        windows.append(verify(originals[i], restored, logs[i]))
    low = max(w[0] for w in windows)
    high = min(w[1] for w in windows)
    assert low < high, f"no single point in time explains both disks: {windows}"


@pytest.mark.parametrize("mark", needs_qemu)
def test_full_then_incrementals_restore_byte_exact(tmp_path: Path, mark: Any) -> None:
    """A full backup that starts the checkpoint, then two incrementals that read only what
    changed; every snapshot of every disk restores to the disk as it was at its T0."""
    paths = images(tmp_path)
    repo = init_repo(tmp_path)
    at_t0: list[list[bytes]] = []
    results = []
    with serving(paths, tmp_path / "run") as served:
        at_t0.append([p.read_bytes() for p in paths])
        results.append(live(served, repo, "disk0", "disk1", "--start-bitmap", "nightly"))
        for round_ in (1, 2):
            guest_write(served, "disk0", round_, round_ * 64 * 1024, "4k")
            guest_write(served, "disk0", round_ + 10, 5 * MiB + round_ * 4096, "100k")
            if round_ == 2:
                guest_write(served, "disk1", 33, 3 * MiB, "64k")
            at_t0.append([p.read_bytes() for p in paths])
            results.append(live(served, repo, "disk0", "disk1", "--incremental", "nightly"))
        assert_clean(served)
        assert [b["name"] for b in checkpoints(served, "disk0")] == [
            results[-1]["disks"][0]["checkpoint"]
        ]
    first, second, third = results
    assert [d["mode"] for d in first["disks"]] == ["full", "full"]
    for result in (second, third):
        assert [d["mode"] for d in result["disks"]] == ["incremental", "incremental"]
        assert all(d["fallback"] is None for d in result["disks"])
        assert "reading the whole disk" not in result["_stderr"]
    # only the dirty clusters were read: 4k -> one 64 KiB cluster, 100k -> two or three
    assert second["disks"][0]["read"] <= 4 * 64 * 1024
    assert second["disks"][1]["read"] == 0
    assert third["disks"][1]["read"] == 64 * 1024
    assert second["disks"][0]["read-from"] == first["disks"][0]["checkpoint"]
    assert snapshot_ids(repo) == [r["snapshot"] for r in results]
    for result, disks in zip(results, at_t0, strict=True):
        for i, data in enumerate(disks):
            out = tmp_path / f"{result['snapshot']}-{i}.img"
            assert restore(repo, f"{result['snapshot']}:disk{i}", out) == data
    manifest = Repository.open(str(repo), PASS.encode()).manifest(third["snapshot"])
    source = manifest.disk("disk0").source
    assert source["checkpoint"] == third["disks"][0]["checkpoint"]
    assert source["read-from"] == second["disks"][0]["checkpoint"]
    assert source["base"] == second["snapshot"]


def _remove_checkpoint(served: Served, repo: Path, tmp_path: Path) -> str:
    (bitmap,) = checkpoints(served, "disk0")
    qmp(served.qmp, "block-dirty-bitmap-remove", {"node": "disk0", "name": bitmap["name"]})
    return "bitmap nightly is missing on disk0"


def _disable_checkpoint(served: Served, repo: Path, tmp_path: Path) -> str:
    (bitmap,) = checkpoints(served, "disk0")
    qmp(served.qmp, "block-dirty-bitmap-disable", {"node": "disk0", "name": bitmap["name"]})
    return "bitmap nightly on disk0 is disabled"


def _bitmap_made_later(served: Served, repo: Path, tmp_path: Path) -> str:
    """The base snapshot started no checkpoint; the user adds a bitmap afterwards."""
    Repository.open(str(repo), PASS.encode()).forget(snapshot_ids(repo)[-1])
    live(served, repo, "disk0", "disk1")  # a full backup without --start-bitmap
    bb("bitmaps", "--connect", served.qmp, "add", "disk0", "nightly")
    return "did not start bitmap nightly"


def _base_pruned(served: Served, repo: Path, tmp_path: Path) -> str:
    """An incremental moved the checkpoint on; its snapshot is then removed."""
    live(served, repo, "disk0", "disk1", "--incremental", "nightly")
    Repository.open(str(repo), PASS.encode()).forget(snapshot_ids(repo)[-1])
    return "bitmap nightly is missing on disk0"


def _killed_run_checkpoint(served: Served, repo: Path, tmp_path: Path) -> str:
    """A run killed after its transaction left a newer checkpoint (made later than the base
    snapshot, never recorded by one); the recorded one is then removed."""
    proc = start(
        "backup", "--connect", served.qmp, "disk0", "--repo", str(repo),
        "--passphrase-env", "BBP", "--incremental", "nightly", "--speed", "1",
    )  # fmt: skip
    guest_write(served, "disk0", 5, 0, "1M")  # something to copy, slowly
    wait_until(lambda: len(checkpoints(served, "disk0")) == 2, "the new checkpoint")
    proc.kill()
    proc.communicate(timeout=60)
    assert "cleaned: job" in bb("jobs", "--connect", served.qmp, "clean").stdout
    recorded = Repository.open(str(repo), PASS.encode()).snapshots()[-1]
    name = recorded.disk("disk0").source["checkpoint"]
    qmp(served.qmp, "block-dirty-bitmap-remove", {"node": "disk0", "name": name})
    return "bitmap nightly is missing on disk0"


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
@pytest.mark.parametrize(
    "breaks",
    [
        _remove_checkpoint,
        _disable_checkpoint,
        _bitmap_made_later,
        _base_pruned,
        _killed_run_checkpoint,
    ],
)
def test_untrusted_checkpoint_reads_the_whole_disk(tmp_path: Path, breaks: Any) -> None:
    """Whatever breaks the chain between the latest snapshot and the bitmap, the incremental
    reads the whole disk (saying why, in one line and in the JSON), and its snapshot is
    still the disk at its T0; the other disk's checkpoint is still used."""
    paths = images(tmp_path)
    repo = init_repo(tmp_path)
    with serving(paths, tmp_path / "run") as served:
        live(served, repo, "disk0", "disk1", "--start-bitmap", "nightly")
        guest_write(served, "disk0", 7, 3 * MiB, "8k")
        reason = breaks(served, repo, tmp_path)
        guest_write(served, "disk0", 8, 6 * MiB, "4k")
        at_t0 = paths[0].read_bytes()
        result = live(served, repo, "disk0", "disk1", "--incremental", "nightly")
        assert_clean(served)
        (bitmap,) = checkpoints(served, "disk0")
        assert bitmap["name"] == result["disks"][0]["checkpoint"]
    disk0, disk1 = result["disks"]
    assert disk0["mode"] == "full"
    assert reason in disk0["fallback"]
    assert disk0["read"] == len(at_t0)
    line = f"blockbackup backup: {disk0['fallback']}: reading the whole disk"
    assert line in result["_stderr"].splitlines()
    if breaks in (_remove_checkpoint, _disable_checkpoint, _killed_run_checkpoint):
        assert disk1["mode"] == "incremental"
    assert restore(repo, f"{result['snapshot']}:disk0", tmp_path / "r.img") == at_t0


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_a_different_disk_size_reads_the_whole_disk(tmp_path: Path) -> None:
    """The disk grew between two backups (serve stopped, the image extended): the checkpoint
    does not cover the new size, so the whole disk is read."""
    (path,) = images(tmp_path, (4 * MiB,))
    repo = init_repo(tmp_path)
    with serving([path], tmp_path / "run") as served:
        live(served, repo, "disk0", "--start-bitmap", "nightly")
    with open(path, "r+b") as f:
        f.truncate(6 * MiB)
    with serving([path], tmp_path / "run") as served:
        result = live(served, repo, "disk0", "--incremental", "nightly")
    (disk,) = result["disks"]
    assert disk["mode"] == "full"
    assert disk["fallback"]
    assert "reading the whole disk" in result["_stderr"]
    assert restore(repo, "latest:disk0", tmp_path / "r.img") == path.read_bytes()


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_checkpoint_survives_a_restart_of_serve(tmp_path: Path) -> None:
    """The checkpoint bitmap is persistent: after serve stopped and started again, the next
    backup is still an incremental, and its snapshot is the disk at its T0."""
    (path,) = images(tmp_path, (4 * MiB,))
    repo = init_repo(tmp_path)
    with serving([path], tmp_path / "run") as served:
        live(served, repo, "disk0", "--start-bitmap", "nightly")
        guest_write(served, "disk0", 3, 2 * MiB, "4k")
    with serving([path], tmp_path / "run") as served:
        guest_write(served, "disk0", 4, 3 * MiB, "4k")
        result = live(served, repo, "disk0", "--incremental", "nightly")
    (disk,) = result["disks"]
    assert disk["mode"] == "incremental", result["_stderr"]
    assert disk["read"] == 2 * 64 * 1024
    assert restore(repo, "latest:disk0", tmp_path / "r.img") == path.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_commits_nothing_and_the_next_one_works(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C cancels (exit 130, nothing left); SIGKILL leaves the run's nodes and jobs,
    which the next run removes before it makes its own snapshot. Neither commits one."""
    paths = images(tmp_path)
    repo = init_repo(tmp_path)
    with serving(paths, tmp_path / "run") as served:
        proc = start(
            "backup", "--connect", served.qmp, "disk0", "disk1", "--repo", str(repo),
            "--passphrase-env", "BBP", "--start-bitmap", "nightly", "--speed", "1M",
        )  # fmt: skip

        def running() -> bool:
            return any(j["status"] == "running" for j in jobs(served.qmp))

        wait_until(running, "the jobs to run")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert snapshot_ids(repo) == []
        if sig != signal.SIGKILL:
            assert proc.returncode == 128 + sig, err
            assert_no_noise(err)
            assert "no snapshot was committed" in err
            assert_clean(served)
            assert checkpoints(served, "disk0") == []
        else:
            assert [n for n in node_names(served.qmp) if n.startswith("bb-")]
        result = live(served, repo, "disk0", "disk1", "--incremental", "nightly")
        if sig == signal.SIGKILL:
            assert "cleaned up after a run that died" in result["_stderr"]
        assert_clean(served)
        assert [d["mode"] for d in result["disks"]] == ["full", "full"]
        assert len(checkpoints(served, "disk0")) == 1
    assert snapshot_ids(repo) == [result["snapshot"]]
    assert restore(repo, "latest:disk1", tmp_path / "r1.img") == paths[1].read_bytes()


def test_mistakes_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    paths = images(tmp_path, (2 * MiB,))
    repo = init_repo(tmp_path)
    with serving(paths, tmp_path / "run") as served:
        env_args = ("--repo", str(repo), "--passphrase-env")
        wrong = bb("backup", "--connect", served.qmp, "disk0", *env_args, "NOPE", check=False)
        assert wrong.returncode == 1
        assert "NOPE is not set" in one_line(wrong.stderr)
        os.environ["WRONG"] = "not the passphrase"
        try:
            wrong = bb("backup", "--connect", served.qmp, "disk0", *env_args, "WRONG", check=False)
        finally:
            del os.environ["WRONG"]
        assert wrong.returncode == 1
        assert "wrong passphrase" in one_line(wrong.stderr)
        unknown = bb("backup", "--connect", served.qmp, "disk0", "nope", *env_args, "BBP",
                     check=False)  # fmt: skip
        assert unknown.returncode == 1
        assert "Cannot find device='nope'" in one_line(unknown.stderr)
        usage = bb("backup", "--connect", served.qmp, "disk0", *env_args, "BBP", "--format",
                   "qcow2", check=False)  # fmt: skip
        assert usage.returncode == 2
        assert "--format does not apply" in one_line(usage.stderr)
        twice = bb("backup", "--connect", served.qmp, "disk0", "disk0", *env_args, "BBP",
                   check=False)  # fmt: skip
        assert twice.returncode == 2
        assert_clean(served)
        assert checkpoints(served, "disk0") == []
    assert snapshot_ids(repo) == []


def test_name_maps_nodes_to_disk_names(tmp_path: Path) -> None:
    paths = images(tmp_path, (2 * MiB, MiB))
    repo = init_repo(tmp_path)
    with serving(paths, tmp_path / "run") as served:
        result = live(served, repo, "disk0", "disk1", "--name", "disk1=data")
    assert [d["disk"] for d in result["disks"]] == ["disk0", "data"]
    assert restore(repo, "latest:data", tmp_path / "r.img") == paths[1].read_bytes()
