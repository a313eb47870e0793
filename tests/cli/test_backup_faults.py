"""Every fault during ``blockbackup backup`` leaves things clean (issue 13, points 6 to 8).

Signals at random points of a backup, a client killed outright, a full target disk: the
daemon ends with no job and no node the backup made, the directory with no partial file,
and the next backup works with the default options.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.backupcli import (
    MiB,
    Served,
    assert_clean,
    assert_no_noise,
    bb,
    jobs,
    node_names,
    one_line,
    partials,
    random_image,
    running_job,
    serving,
    start,
    wait_until,
)
from testkit.backupcli import (
    qmp as qmp_command,
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    image = tmp_path / "disk.img"
    random_image(image, 16 * MiB)
    with serving([image], tmp_path / "run") as s:
        yield s


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_cancels_the_backup_and_leaves_nothing(
    served: Served, tmp_path: Path, sig: signal.Signals
) -> None:
    rng = random.Random(f"{sig.name}")
    for run in range(3):
        target = tmp_path / f"backup-{run}.img"
        point = rng.uniform(0.0, 0.6)  # how far the copy got when the signal comes
        proc = start("backup", "--connect", served.qmp, "disk", str(target),
                     "--speed", "4M", "--json")  # fmt: skip
        try:
            wait_until(lambda p=point: running_job(served.qmp, p), f"{point:.0%} of a backup")
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 128 + sig, err
        assert_no_noise(err)
        assert f"cancelled ({sig.name})" in one_line(err)
        result = json.loads(out)
        assert (result["status"], result["error"]) == ("cancelled", sig.name)
        assert not target.exists()
        assert_clean(served.qmp, tmp_path)


def test_after_a_killed_client_the_next_backup_works_and_cleans_up(
    served: Served, tmp_path: Path
) -> None:
    for job_id in (None, "nightly"):  # its own job id, then the same --job-id twice
        options = ["--job-id", job_id] if job_id else []
        proc = start("backup", "--connect", served.qmp, "disk", str(tmp_path / "dead.img"),
                     "--speed", "2M", *options)  # fmt: skip
        wait_until(lambda: running_job(served.qmp, 0.1), "the backup to run")
        proc.kill()
        proc.communicate(timeout=30)
        (left,) = jobs(served.qmp)
        assert left["status"] == "running"
        assert [n for n in node_names(served.qmp) if n.startswith("bb-")]
        assert partials(tmp_path)
        target = tmp_path / f"next-{job_id}.img"
        run = bb("backup", "--connect", served.qmp, "disk", str(target), *options)
        assert f"cleaned up after a run that died: job {left['id']} (running)" in run.stderr
        assert target.read_bytes() == (tmp_path / "disk.img").read_bytes()
        assert not (tmp_path / "dead.img").exists()
        assert_clean(served.qmp, tmp_path)


def _kill_a_backup(served: Served, target: Path) -> str:
    """A backup whose client was killed mid-copy; its job id."""
    proc = start("backup", "--connect", served.qmp, "disk", str(target), "--speed", "2M")
    job = wait_until(lambda: running_job(served.qmp, 0.1), "the backup to run")
    proc.kill()
    proc.communicate(timeout=30)
    return str(job["id"])


def test_jobs_clean_undoes_a_dead_run(served: Served, tmp_path: Path) -> None:
    job_id = _kill_a_backup(served, tmp_path / "dead.img")
    run = bb("jobs", "--connect", served.qmp, "clean")
    assert f"cleaned: job {job_id} (running), node {job_id}-target, file " in run.stdout
    assert_clean(served.qmp, tmp_path)
    assert bb("jobs", "--connect", served.qmp, "clean").stdout == "nothing to clean\n"


def test_jobs_cancel_undoes_a_dead_run(served: Served, tmp_path: Path) -> None:
    job_id = _kill_a_backup(served, tmp_path / "dead.img")
    run = bb("jobs", "--connect", served.qmp, "cancel", job_id)
    assert run.stdout == f"cancelled job {job_id}\n"
    assert_clean(served.qmp, tmp_path)


def test_jobs_dismiss_and_cancel_of_a_live_run(served: Served, tmp_path: Path) -> None:
    target = tmp_path / "live.img"
    proc = start("backup", "--connect", served.qmp, "disk", str(target), "--speed", "2M")
    try:
        job = wait_until(lambda: running_job(served.qmp, 0.1), "the backup to run")
        run = bb("jobs", "--connect", served.qmp, "dismiss", job["id"], check=False)
        assert run.returncode == 1
        assert "cannot accept command verb 'dismiss'" in one_line(run.stderr)
        bb("jobs", "--connect", served.qmp, "cancel", job["id"])
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1  # the live run saw its job cancelled, and cleaned up
    assert "backup failed: Operation canceled" in err
    assert not target.exists()
    assert_clean(served.qmp, tmp_path)
    run = bb("jobs", "--connect", served.qmp, "cancel", "nosuch", check=False)
    assert "Job ID 'nosuch' not found" in one_line(run.stderr)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def big_served(tmp_path: Path) -> Iterator[Served]:
    image = tmp_path / "disk.img"
    random_image(image, 96 * MiB)  # more than the 64 MiB disk holds
    with serving([image], tmp_path / "run") as s:
        yield s


def test_a_full_disk_fails_with_its_reason_and_a_retry_elsewhere_works(
    big_served: Served, full_disk: Path, tmp_path: Path
) -> None:
    target = full_disk / "backup.img"
    run = bb("backup", "--connect", big_served.qmp, "disk", str(target), check=False)
    assert run.returncode == 1
    assert "blockbackup backup: backup failed: No space left on device" in run.stderr
    assert_no_noise(run.stderr)
    assert os.listdir(full_disk) == []  # no partial file, no file under the final name
    assert jobs(big_served.qmp) == []
    retry = tmp_path / "backup.img"
    bb("backup", "--connect", big_served.qmp, "disk", str(retry))
    assert retry.read_bytes() == (tmp_path / "disk.img").read_bytes()


def test_a_full_disk_leaves_no_node_behind(
    big_served: Served, full_disk: Path, tmp_path: Path
) -> None:
    run = bb("backup", "--connect", big_served.qmp, "disk", str(full_disk / "b.img"),
             check=False)  # fmt: skip
    assert "backup failed: No space left on device" in one_line(run.stderr)
    assert_clean(big_served.qmp, full_disk)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
@pytest.mark.parametrize("renamed", [True, False])
def test_a_run_that_died_at_pending_keeps_the_bitmap_right(
    served: Served, tmp_path: Path, renamed: bool
) -> None:
    """A run killed after its job reached 'pending': if the backup already has its name it
    is complete, so the job is finalized (the bitmap forgets what it copied); if not, the
    job is cancelled and the bitmap keeps every change for the next backup."""
    qmp = served.qmp
    bb("bitmaps", "--connect", qmp, "add", "disk", "nightly")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 3 0 64k", served.uri],
                   check=True, capture_output=True)  # fmt: skip
    tag = f"bb-{_dead_pid()}-abcdef"  # what the dead run named its job, node and file
    final = tmp_path / "b.img"
    partial = tmp_path / f".b.img.partial-{tag}"
    with open(partial, "wb") as f:
        f.truncate(16 * MiB)
    file = {"driver": "file", "filename": str(partial)}
    qmp_command(qmp, "blockdev-add", {"driver": "raw", "node-name": f"{tag}-target", "file": file})
    qmp_command(qmp, "blockdev-backup", {
        "job-id": tag, "device": "disk", "target": f"{tag}-target", "sync": "full",
        "bitmap": "nightly", "bitmap-mode": "on-success",
        "auto-finalize": False, "auto-dismiss": False,
    })  # fmt: skip
    wait_until(lambda: [j["status"] for j in jobs(qmp)] == ["pending"], "the job to be pending")
    if renamed:
        partial.rename(final)
    run = bb("jobs", "--connect", qmp, "clean")
    assert f"cleaned: job {tag} (pending), node {tag}-target" in run.stdout
    rows = json.loads(bb("bitmaps", "--connect", qmp, "list", "--json").stdout)
    assert [r["count"] for r in rows] == [0 if renamed else 65536]
    assert final.exists() == renamed
    if renamed:
        assert final.read_bytes() == (tmp_path / "disk.img").read_bytes()
    assert_clean(qmp, tmp_path)
