"""What a ``backup`` run that died leaves outside the daemon's memory: its partial file
after the daemon restarted, and the bitmap its --start-bitmap created. The next run to the
same target (or ``jobs clean``) removes them, and only those of runs that are gone; and
errors of the daemon that ``serve`` starts are named ``blockbackup serve:``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testkit.backupcli import (
    MiB,
    assert_clean,
    bb,
    partials,
    running_job,
    serving,
    start,
    wait_until,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qcow2_image(tmp_path: Path) -> Path:
    """A 16 MiB qcow2 image full of random data (it stores persistent bitmaps)."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(16 * MiB))
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True, capture_output=True)  # fmt: skip
    raw.unlink()
    return image


def bitmap_names(qmp: str) -> list[str]:
    rows = json.loads(bb("bitmaps", "--connect", qmp, "list", "--json").stdout)
    return sorted(str(r["name"]) for r in rows if "name" in r)  # not a job's successor


def kill_a_backup(qmp: str, target: Path, *options: str) -> None:
    proc = start("backup", "--connect", qmp, "disk", str(target), "--speed", "1M", *options)
    wait_until(lambda: running_job(qmp, 0.05), "the backup to run")
    proc.kill()
    proc.communicate(timeout=30)


def test_after_a_daemon_restart_the_next_backup_removes_the_dead_runs_leftovers(
    tmp_path: Path,
) -> None:
    image = qcow2_image(tmp_path)
    backups = tmp_path / "backups"
    backups.mkdir()
    target = backups / "b.img"
    with serving([image], tmp_path / "run") as served:
        kill_a_backup(served.qmp, target, "--start-bitmap", "nightly")
        assert bitmap_names(served.qmp) == ["nightly"]
    # the daemon stopped (the job with it; the persistent bitmap was stored): nothing in
    # the daemon names the dead run's files any more
    left = partials(backups)
    assert len(left) == 2  # the partial file and the record of the bitmap the run created
    mine = backups / f".b.img.partial-bb-{os.getpid()}-abcdef"  # a live process's: kept
    mine.write_bytes(b"")
    with serving([image], tmp_path / "run") as served:
        assert bitmap_names(served.qmp) == ["nightly"]
        run = bb("backup", "--connect", served.qmp, "disk", str(target))
        assert "removed bitmap nightly of node disk (its backup never completed)" in run.stderr
        assert "removed the partial file of a run that died" in run.stderr
        assert bitmap_names(served.qmp) == []
        assert partials(backups) == [mine.name]
        mine.unlink()
        assert_clean(served.qmp, backups)
        assert target.exists()


def test_jobs_clean_removes_the_bitmap_a_dead_run_created(tmp_path: Path) -> None:
    image = qcow2_image(tmp_path)
    with serving([image], tmp_path / "run") as served:
        bb("bitmaps", "--connect", served.qmp, "add", "disk", "theirs")
        kill_a_backup(served.qmp, tmp_path / "b.img", "--start-bitmap", "nightly")
        assert bitmap_names(served.qmp) == ["nightly", "theirs"]
        cleaned = bb("jobs", "--connect", served.qmp, "clean").stdout
        assert "bitmap nightly of node disk (its backup never completed)" in cleaned
        assert bitmap_names(served.qmp) == ["theirs"]  # only the one the dead run made
        assert_clean(served.qmp, tmp_path)
        # a bitmap that existed before the run is the user's: never removed
        kill_a_backup(served.qmp, tmp_path / "c.img", "--start-bitmap", "theirs")
        bb("jobs", "--connect", served.qmp, "clean")
        assert bitmap_names(served.qmp) == ["theirs"]
        assert_clean(served.qmp, tmp_path)


def test_a_bitmap_of_a_complete_backup_is_kept(tmp_path: Path) -> None:
    """A run that died after its backup got its name: the bitmap is right, it stays."""
    image = qcow2_image(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    target = tmp_path / "b.img"
    target.write_bytes(b"a complete backup")
    (tmp_path / f".b.img.partial-bb-{dead.pid}-abcdef.bitmap").write_text(
        json.dumps({"node": "disk", "bitmap": "nightly"})
    )
    with serving([image], tmp_path / "run") as served:
        bb("bitmaps", "--connect", served.qmp, "add", "disk", "nightly")
        bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "other.img"))
        bb("backup", "--connect", served.qmp, "disk", str(target), "--force")
        assert bitmap_names(served.qmp) == ["nightly"]
        assert_clean(served.qmp, tmp_path)


def test_daemon_start_errors_are_named_after_serve(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(1 << 20))
    run = bb("serve", str(bad), "--format", "qcow2", "--dir", str(tmp_path / "run"), check=False)
    assert run.returncode == 1
    assert run.stderr.startswith("blockbackup serve: qcow2: "), run.stderr
    assert run.stderr.count("\n") == 1
