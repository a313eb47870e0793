"""``blockbackup vm backup`` against a real QEMU (paused, no guest: writes go through the
disks' own devices with HMP qemu-io, from a thread, while the backup runs).

Each restored disk must be exactly the disk at one point of the write sequence, and one
point for all disks of a snapshot; QEMU must hold nothing of ours between runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from blockbackup.vm.reserve import reservation
from testkit.qemuvm import (
    BLOCKBACKUP,
    QEMU,
    DiskSpec,
    MiB,
    Model,
    Vm,
    Writer,
    make_disk,
    run_bb,
    vm_backup,
)
from testkit.tmpfs import mounted_tmpfs

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.timeout(300),
]

INITIAL = 4 * MiB  # each disk starts with 4 MiB of 0xff, zeroes after


def fill_initial(path: Path) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xff 0 {INITIAL}", str(path)],
        check=True,
        capture_output=True,
    )


def initial_bytes(size: int) -> bytes:
    return b"\xff" * INITIAL + bytes(size - INITIAL)


@pytest.fixture
def repo(tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    result = run_bb("repo", "init", path, "--no-encryption")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def backup(vm: Vm, repo: str, scratch: Path, *extra: str) -> tuple[dict[str, Any], str]:
    return vm_backup(vm.qmp, repo, scratch, *extra)


def restore(repo: str, snapshot: str, disk: str, out: Path) -> bytes:
    result = run_bb("vm", "restore", "--repo", repo, snapshot, "--disk", disk, str(out))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def assert_clean(vm: Vm, scratch: Path) -> None:
    """Nothing of ours is left, and no guest write failed (HMP qemu-io reports a failed
    write on QEMU's stdout, not in the monitor's reply)."""
    assert vm.ours_left() == []
    assert "failed" not in (vm.tmp / "qemu.log").read_text()
    assert not vm.nbd_server_running()
    assert os.listdir(scratch) == []


def checkpoints(vm: Vm, node: str) -> list[str]:
    return [name for name in vm.bitmaps(node) if name.startswith("bb-")]


def test_full_then_incrementals_of_two_disks_at_one_point_in_time(
    tmp_path: Path, repo: str, scratch: Path
) -> None:
    disks = [
        make_disk(tmp_path, "drive0", "vd0", 64 * MiB),
        make_disk(tmp_path, "drive1", "vd1", 32 * MiB + 1536),  # not whole chunks
    ]
    for d in disks:
        fill_initial(d.path)
    model = Model([initial_bytes(d.size) for d in disks])
    vm = Vm(tmp_path, disks).start()
    try:
        vm.cmd("block-dirty-bitmap-add", node="drive0", name="users-own", persistent=True)
        writer = Writer(vm, model)
        for block in range(8):
            writer.write(0, block)
            writer.write(1, block)
        snapshots = []
        for n in range(3):
            with writer.running():
                time.sleep(0.3)
                before = len(model.writes)
                result, stderr = backup(vm, repo, scratch)
                during = len(model.writes) - before
            assert during > 0, "the writer must write while the backup runs"
            assert_clean(vm, scratch)
            modes = [d["mode"] for d in result["disks"]]
            assert modes == (["full", "full"] if n == 0 else ["incremental", "incremental"]), stderr
            assert [d["name"] for d in result["disks"]] == ["vm1/drive0", "vm1/drive1"]
            for d, spec in zip(result["disks"], disks, strict=True):
                # one checkpoint per disk: the one this snapshot recorded; others' stay
                assert checkpoints(vm, spec.node) == [d["checkpoint"]]
                if n:  # only what changed was read: the writer's first 256 blocks at most
                    assert 0 < d["dirty_bytes"] <= 256 * 64 * 1024 < spec.size
            assert "users-own" in vm.bitmaps("drive0")
            snapshots.append(result["snapshot"])
        writer.close()
        previous = 0
        for snapshot in snapshots:
            lo, hi = 0, len(model.writes)
            images = []
            for i, spec in enumerate(disks):
                image = restore(repo, snapshot, spec.node, tmp_path / "out.img")
                interval = model.interval(i, image)
                assert interval is not None, f"{snapshot} {spec.node} is no point in time"
                lo, hi = max(lo, interval[0]), min(hi, interval[1])
                images.append(image)
            assert lo <= hi, f"{snapshot}: the disks are of different points in time"
            assert lo >= previous
            previous = lo
            for i, image in enumerate(images):
                assert image == model.state(i, lo)  # byte for byte
    finally:
        vm.quit()


def test_a_lost_or_inconsistent_checkpoint_gives_a_full_backup(
    tmp_path: Path, repo: str, scratch: Path
) -> None:
    disks = [make_disk(tmp_path, "drive0", "vd0", 16 * MiB)]
    fill_initial(disks[0].path)
    model = Model([initial_bytes(disks[0].size)])
    vm = Vm(tmp_path, disks).start()
    try:
        writer = Writer(vm, model)
        result, _ = backup(vm, repo, scratch)
        assert result["disks"][0]["mode"] == "full"
        first = result["disks"][0]["checkpoint"]

        # someone removes the checkpoint
        vm.cmd("block-dirty-bitmap-remove", node="drive0", name=first)
        writer.write(0, 3)
        result, stderr = backup(vm, repo, scratch)
        assert result["disks"][0]["mode"] == "full"
        assert f"vm1/drive0: full backup: checkpoint {first} is gone" in stderr
        assert len(stderr.strip().splitlines()) == 1
        second = result["disks"][0]["checkpoint"]
        image = restore(repo, result["snapshot"], "drive0", tmp_path / "a.img")
        assert image == model.state(0, len(model.writes))

        # QEMU crashes while the checkpoint is in use: the image marks it inconsistent
        writer.close()
        vm.quit()  # stores the persistent bitmap
        vm.start()
        vm.kill()
        vm.start()
        assert vm.bitmaps("drive0")[second].get("inconsistent") is True
        writer = Writer(vm, model)
        writer.write(0, 5)
        result, stderr = backup(vm, repo, scratch)
        assert result["disks"][0]["mode"] == "full"
        assert f"checkpoint {second} is inconsistent" in stderr
        assert checkpoints(vm, "drive0") == [result["disks"][0]["checkpoint"]]
        image = restore(repo, result["snapshot"], "drive0", tmp_path / "b.img")
        assert image == model.state(0, len(model.writes))

        # and the chain goes on
        writer.write(0, 7)
        result, stderr = backup(vm, repo, scratch)
        assert result["disks"][0]["mode"] == "incremental", stderr
        assert result["disks"][0]["dirty_bytes"] == 64 * 1024
        image = restore(repo, result["snapshot"], "drive0", tmp_path / "c.img")
        assert image == model.state(0, len(model.writes))
        assert_clean(vm, scratch)
        writer.close()
    finally:
        vm.quit()


def _spawn_backup(vm: Vm, repo: str, scratch: Path, *extra: str) -> subprocess.Popen[str]:
    """``vm backup --json`` running in the background, its output piped."""
    argv = [BLOCKBACKUP, "vm", "backup", "--qmp", vm.qmp, "--repo", repo]
    argv += ["--scratch-dir", str(scratch), "--json", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_backup(vm: Vm, repo: str, scratch: Path, *extra: str) -> subprocess.Popen[str]:
    proc = _spawn_backup(vm, repo, scratch, *extra)
    deadline = time.monotonic() + 60
    # the export is the last step in QEMU: from then on blockbackup reads (128 MiB)
    while not any(e["id"].startswith("bbvm-") for e in vm.cmd("query-block-exports")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    assert proc.poll() is None, "the backup must still be running (make the disk larger)"
    return proc


def _rewrite(vm: Vm, tmp_path: Path, data: bytes, size: int) -> bytes:
    """The guest rewrites the first ``size`` bytes with random data; the disk's new content."""
    fresh = os.urandom(size)
    (tmp_path / "fresh").write_bytes(fresh)
    line = f'qemu-io -d vd0/virtio-backend "write -s {tmp_path / "fresh"} 0 {size}"'
    assert "error" not in vm.cmd("human-monitor-command", **{"command-line": line}).lower()
    return fresh + data[size:]


def test_killed_or_interrupted_backup_leaves_nothing_that_blocks_the_next(
    tmp_path: Path, repo: str, scratch: Path
) -> None:
    """SIGKILL and Ctrl-C in the middle of an incremental: the next run cleans up, and
    its incremental still holds every write since the last snapshot."""
    raw = tmp_path / "random.raw"
    data = os.urandom(192 * MiB)
    raw.write_bytes(data)
    qcow2 = tmp_path / "drive0.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    changed = 128 * MiB
    vm = Vm(tmp_path, [DiskSpec("drive0", "vd0", qcow2, len(data))]).start()
    try:
        result, _ = backup(vm, repo, scratch)
        kept = result["disks"][0]["checkpoint"]

        data = _rewrite(vm, tmp_path, data, changed)
        proc = _start_backup(vm, repo, scratch)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert vm.ours_left() != []
        shown = run_bb("vm", "checkpoints", "--qmp", vm.qmp, "--repo", repo, "--json")
        assert shown.returncode == 0, shown.stderr
        info = json.loads(shown.stdout)
        assert info["leftovers"], info
        assert info["disks"][0]["next"] == {
            "mode": "incremental",
            "checkpoint": kept,
            "reason": None,
        }

        # the next run removes what the killed one left; the kept checkpoint still works
        result, stderr = backup(vm, repo, scratch)
        assert "removed what an interrupted run left" in stderr
        assert result["disks"][0]["mode"] == "incremental"
        assert result["disks"][0]["dirty_bytes"] == changed
        assert_clean(vm, scratch)
        kept = result["disks"][0]["checkpoint"]
        assert checkpoints(vm, "drive0") == [kept]  # the killed run's checkpoint is gone
        assert restore(repo, result["snapshot"], "drive0", tmp_path / "a.img") == data

        # Ctrl-C: the run undoes its own work, exits 130, the checkpoint is as it was
        data = _rewrite(vm, tmp_path, data, changed)
        proc = _start_backup(vm, repo, scratch)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert_clean(vm, scratch)
        assert checkpoints(vm, "drive0") == [kept]
        assert vm.bitmaps("drive0")[kept]["recording"] is True
        assert vm.bitmaps("drive0")[kept]["count"] == changed

        result, _ = backup(vm, repo, scratch)
        assert result["disks"][0]["mode"] == "incremental"
        assert result["disks"][0]["dirty_bytes"] == changed
        assert restore(repo, result["snapshot"], "drive0", tmp_path / "b.img") == data
    finally:
        vm.quit()


def test_a_failed_incremental_leaves_qemu_and_its_checkpoint_as_they_were(
    tmp_path: Path, scratch: Path
) -> None:
    """The repository's file system fills up during an incremental: one line, exit 1,
    nothing of ours in QEMU, no snapshot, and the checkpoint still holds every write."""
    from testkit.tmpfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "small", "24m") as small:
        repo = str(small / "repo")
        assert run_bb("repo", "init", repo, "--no-encryption").returncode == 0
        raw = tmp_path / "d.raw"
        data = os.urandom(8 * MiB) + bytes(40 * MiB)
        raw.write_bytes(data)
        qcow2 = tmp_path / "drive0.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
        vm = Vm(tmp_path, [DiskSpec("drive0", "vd0", qcow2, len(data))]).start()
        try:
            result, _ = backup(vm, repo, scratch)
            kept = result["disks"][0]["checkpoint"]
            _rewrite(vm, tmp_path, data, 32 * MiB)
            failed = run_bb(
                "vm", "backup", "--qmp", vm.qmp, "--repo", repo, "--scratch-dir", str(scratch)
            )
            assert failed.returncode == 1
            lines = failed.stderr.strip().splitlines()
            assert len(lines) == 1, failed.stderr
            assert lines[0].startswith("blockbackup vm backup: ")
            assert lines[0].endswith("vm1/drive0: backup failed: No space left on device")
            assert_clean(vm, scratch)
            assert checkpoints(vm, "drive0") == [kept]
            assert vm.bitmaps("drive0")[kept]["recording"] is True
            assert vm.bitmaps("drive0")[kept]["count"] == 32 * MiB
            listed = run_bb("snapshots", "--repo", repo, "--json")
            assert [s["id"] for s in json.loads(listed.stdout)] == [result["snapshot"]]
        finally:
            vm.quit()


def test_each_disk_is_released_as_soon_as_it_is_read(
    tmp_path: Path, repo: str, scratch: Path
) -> None:
    """The guest pays the copy-before-write cost of a disk only until that disk is read."""
    small = make_disk(tmp_path, "drive0", "vd0", 4 * MiB)
    raw = tmp_path / "big.raw"
    raw.write_bytes(os.urandom(128 * MiB))
    big = DiskSpec("drive1", "vd1", tmp_path / "drive1.qcow2", 128 * MiB)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(big.path)], check=True)
    raw.unlink()
    vm = Vm(tmp_path, [small, big]).start()
    try:
        proc = _spawn_backup(vm, repo, scratch)
        seen = []
        while proc.poll() is None:
            jobs = sorted(j["device"] for j in vm.cmd("query-block-jobs"))
            if jobs and jobs not in seen:
                seen.append(jobs)
            time.sleep(0.01)
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        # at some moment the big disk's view was there and the small one's was gone
        assert any(len(jobs) == 1 and jobs[0].endswith("-1") for jobs in seen), seen
        assert json.loads(out)["disks"][1]["mode"] == "full"
        assert_clean(vm, scratch)
    finally:
        vm.quit()


def test_someone_elses_nbd_server_is_refused_and_nothing_changes(
    tmp_path: Path, repo: str, scratch: Path
) -> None:
    disks = [make_disk(tmp_path, "drive0", "vd0", 8 * MiB)]
    vm = Vm(tmp_path, disks).start()
    try:
        theirs = str(tmp_path / "theirs.sock")
        vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": theirs}})
        result = run_bb(
            "vm", "backup", "--qmp", vm.qmp, "--repo", repo, "--scratch-dir", str(scratch)
        )
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "already runs an NBD server" in lines[0]
        assert vm.bitmaps("drive0") == {}
        assert vm.ours_left() == []
        assert os.listdir(scratch) == []
        assert os.path.exists(theirs)  # their server still runs
        vm.cmd("nbd-server-stop")
        result2 = run_bb(
            "vm", "backup", "--qmp", vm.qmp, "--repo", repo, "--scratch-dir", str(scratch)
        )
        assert result2.returncode == 0, result2.stderr
    finally:
        vm.quit()


def test_an_nbd_server_a_killed_run_started_is_recognised_and_stopped(
    tmp_path: Path, repo: str, scratch: Path
) -> None:
    """A run killed between nbd-server-start and its first export leaves only the server;
    it listens in a scratch directory of ours that names this monitor."""
    vm = Vm(tmp_path, [make_disk(tmp_path, "drive0", "vd0", 4 * MiB)]).start()
    try:
        left = scratch / "bbvm-0badc0de"
        left.mkdir(mode=0o700)
        (left / "qmp-socket").write_text(os.path.realpath(vm.qmp))
        path = str(left / "nbd.sock")
        vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": path}})
        _result, stderr = backup(vm, repo, scratch)
        assert "removed what an interrupted run left" in stderr
        assert "NBD server" in stderr
        assert_clean(vm, scratch)
    finally:
        vm.quit()


def test_a_monitor_that_cannot_do_pull_backups_is_named(tmp_path: Path, repo: str) -> None:
    """blockbackup's own daemon speaks QMP but is no QEMU with devices: one clear line."""
    sock = str(tmp_path / "d.sock")
    daemon = subprocess.Popen(
        [
            BLOCKBACKUP,
            "daemon",
            "--chardev",
            f"socket,id=m0,path={sock},server=on,wait=off",
            "--monitor",
            "chardev=m0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = run_bb("vm", "backup", "--qmp", sock, "--repo", repo)
        assert result.returncode == 1
        line = result.stderr.strip()
        assert line.startswith("blockbackup vm backup: QEMU")
        assert "cannot be driven: it lacks" in line
        assert "query-block" in line
        assert "\n" not in line
    finally:
        daemon.terminate()
        daemon.wait(30)


def test_encrypted_repository_and_a_relative_scratch_dir(tmp_path: Path) -> None:
    """The repository's secret comes from the environment; a relative --scratch-dir is
    ours, not QEMU's working directory; restore names the disks a snapshot has."""
    env = {**os.environ, "BB_PASSPHRASE": "correct horse"}
    repo = str(tmp_path / "repo")
    init = run_bb("repo", "init", repo, "--passphrase-env", "BB_PASSPHRASE", env=env)
    assert init.returncode == 0, init.stderr
    (tmp_path / "scratch").mkdir()
    disks = [make_disk(tmp_path, "drive0", "vd0", 4 * MiB)]
    fill_initial(disks[0].path)
    vm = Vm(tmp_path, disks).start()
    try:
        wrong = run_bb(
            "vm",
            "backup",
            "--qmp",
            vm.qmp,
            "--repo",
            repo,
            "--disk",
            "nope",
            "--passphrase-env",
            "BB_PASSPHRASE",
            env=env,
        )
        assert wrong.returncode == 1
        assert wrong.stderr == (
            "blockbackup vm backup: the VM has no disk 'nope' (its disks: drive0)\n"
        )
        result = run_bb(
            "vm",
            "backup",
            "--disk",
            "vd0",
            "--qmp",
            vm.qmp,
            "--repo",
            repo,
            "--scratch-dir",
            "scratch",
            "--passphrase-env",
            "BB_PASSPHRASE",
            "--json",
            env=env,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        snapshot = json.loads(result.stdout)["snapshot"]
        assert os.listdir(tmp_path / "scratch") == []
    finally:
        vm.quit()
    out = tmp_path / "out.img"
    args = ("vm", "restore", "--repo", repo, snapshot, "--passphrase-env", "BB_PASSPHRASE")
    bad = run_bb(*args, "--disk", "nope", str(out), env=env)
    assert bad.returncode == 1
    assert "has no disk 'nope' (its disks: vm1/drive0)" in bad.stderr
    assert not out.exists()
    good = run_bb(*args, "--disk", "vm1/drive0", str(out), "--format", "qcow2", env=env)
    assert good.returncode == 0, good.stderr
    converted = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out), str(converted)], check=True)
    assert converted.read_bytes() == initial_bytes(4 * MiB)


def test_what_qemu_7_2_offers_is_read_from_its_schema(tmp_path: Path) -> None:
    """``on-cbw-error`` (QEMU 10.1) is passed only where the schema has it."""
    import asyncio
    import concurrent.futures

    from qemu.qmp import QMPClient

    from blockbackup.vm.qemu import Qemu

    vm = Vm(tmp_path, [make_disk(tmp_path, "drive0", "vd0", 4 * MiB)]).start()

    async def ask() -> tuple[bool, bool, bool]:
        client = QMPClient("test")
        await client.connect(vm.qmp)
        try:
            qemu = Qemu(client)
            await qemu.check_capabilities()
            return (
                await qemu.command_takes("blockdev-backup", "sync"),
                await qemu.command_takes("blockdev-backup", "on-cbw-error"),
                await qemu.command_takes("no-such-command", "sync"),
            )
        finally:
            await client.disconnect()

    try:
        # in its own thread: the legacy monitor client of ``vm`` owns this thread's loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            has_sync, has_cbw_error, nothing = pool.submit(asyncio.run, ask()).result()
        version = vm.cmd("query-version")["qemu"]
    finally:
        vm.quit()
    assert has_sync
    assert not nothing
    assert has_cbw_error == ((version["major"], version["minor"]) >= (10, 1))


# -- the scratch file system: QEMU 7.2 fails a guest's write when its copy-before-write copy
# cannot be stored, so vm backup reserves each fleece image's worst case before the job


def test_no_room_for_the_reservation_stops_before_the_guest_is_touched(
    tmp_path: Path, repo: str, scratch: Path
) -> None:
    size = 64 * MiB
    disk = make_disk(tmp_path, "drive0", "vd0", size)
    model = Model([bytes(size)])
    vm = Vm(tmp_path, [disk]).start()
    try:
        writer = Writer(vm, model)
        with mounted_tmpfs(tmp_path / "small", "16m") as small:
            failed = run_bb(
                "vm", "backup", "--qmp", vm.qmp, "--repo", repo, "--scratch-dir", str(small)
            )
            assert failed.returncode == 1, failed.stderr
            assert failed.stderr.splitlines() == [
                f"blockbackup vm backup: scratch {small} has no room for the copy-before-write "
                f"image of drive0 (needs {reservation(size)} bytes): use --scratch-dir"
            ]
            assert_clean(vm, small)
            assert vm.bitmaps("drive0") == {}
            for block in range(16):  # the guest writes as before
                writer.write(0, block)
        with writer.running():
            result, _ = backup(vm, repo, scratch)
        writer.close()
        assert_clean(vm, scratch)
        image = restore(repo, result["snapshot"], "drive0", tmp_path / "out.img")
        interval = model.interval(0, image)
        assert interval is not None
        assert interval[0] >= 16
    finally:
        vm.quit()


def _fill(directory: Path) -> None:
    """Take every free byte of ``directory``'s file system."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (MiB, 65536, 4096):  # then what is left smaller than a MiB
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(chunk)):
                    pass
    finally:
        os.close(fd)


def _stop_once_the_job_runs(
    vm: Vm, repo: str, scratch: Path, extra: str | None
) -> subprocess.Popen[str]:
    """Start a backup and SIGSTOP it as soon as its job exists: the copy-before-write
    filter is in place and nothing is read (nor the disk released) until SIGCONT."""
    proc = _spawn_backup(vm, repo, scratch, *([extra] if extra else []))
    deadline = time.monotonic() + 60
    while not vm.cmd("query-block-jobs"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGSTOP)
    return proc


@pytest.mark.parametrize("thin", [False, True], ids=["reserved", "thin"])
def test_a_full_scratch_never_fails_a_guest_rewriting_its_whole_disk(
    tmp_path: Path, repo: str, thin: bool
) -> None:
    """The backup stops (SIGSTOP) once QEMU exports its view; the scratch file system is
    filled; the guest rewrites its whole disk, so every cluster is copied into the fleece
    image. Reserved: every write succeeds and the restore is the disk before. Thin
    (``--thin-scratch``, the behaviour before the reservation): the guest's write fails."""
    size = 32 * MiB
    data = os.urandom(size)  # zeroes would be copied as zero clusters, taking no space
    raw = tmp_path / "d.raw"
    raw.write_bytes(data)
    qcow2 = tmp_path / "drive0.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    fresh = tmp_path / "fresh"
    fresh.write_bytes(os.urandom(size))
    room = -(-(reservation(size) + MiB) // MiB)  # the reservation and a little more
    vm = Vm(tmp_path, [DiskSpec("drive0", "vd0", qcow2, size)]).start()
    try:
        with mounted_tmpfs(tmp_path / "small", f"{room}m") as small:
            proc = _stop_once_the_job_runs(vm, repo, small, "--thin-scratch" if thin else None)
            try:
                assert len(vm.cmd("query-block-jobs")) == 1  # not released yet
                _fill(small)
                line = f'qemu-io -d vd0/virtio-backend "write -s {fresh} 0 {size}"'
                vm.cmd("human-monitor-command", **{"command-line": line})
                # the new checkpoint counts what reached the disk; qemu-io says why not
                (new,) = checkpoints(vm, "drive0")
                written = vm.bitmaps("drive0")[new]["count"]
                (fleece,) = small.glob("bbvm-*/0.fleece.qcow2")
                fleece_size = fleece.stat().st_size
                (small / "filler").unlink()
            finally:
                proc.send_signal(signal.SIGCONT)
                out, err = proc.communicate(timeout=120)  # the run's teardown frees the tmpfs
            said = (tmp_path / "qemu.log").read_text()
            if thin:
                assert written == 0
                assert "write failed: No space left on device" in said
                return
            assert written == size
            assert "failed" not in said, said
            assert fleece_size == reservation(size)  # every copy landed in the reservation
            assert proc.returncode == 0, err
            assert_clean(vm, small)
        result = json.loads(out)
        assert restore(repo, result["snapshot"], "drive0", tmp_path / "out.img") == data
    finally:
        vm.quit()
