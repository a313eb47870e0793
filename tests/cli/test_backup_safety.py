"""``blockbackup backup`` never gives a wrong backup silently (issue 13, points 1 to 3).

An existing target is refused unless ``--force``, and then replaced whole; the source, or
any file the daemon has open, is never a target (by device and inode, not by name); the
backup gets its name only once it is complete.
"""

from __future__ import annotations

import json
import os
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
    bb,
    one_line,
    partials,
    random_image,
    running_job,
    serving,
    start,
    wait_until,
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    image = tmp_path / "disk.img"
    random_image(image, 8 * MiB)
    with serving([image], tmp_path / "run") as s:
        yield s


def test_an_existing_target_is_refused_without_force(served: Served, tmp_path: Path) -> None:
    target = tmp_path / "backup.img"
    old = os.urandom(8 * MiB)  # last week's backup, same size: the easiest to overwrite
    target.write_bytes(old)
    run = bb("backup", "--connect", served.qmp, "disk", str(target), check=False)
    assert run.returncode == 2
    assert "backup.img exists; choose a new name, or --force" in one_line(run.stderr)
    assert target.read_bytes() == old
    assert_clean(served.qmp, tmp_path)
    bb("backup", "--connect", served.qmp, "disk", str(target), "--force")
    assert target.read_bytes() == (tmp_path / "disk.img").read_bytes()
    assert_clean(served.qmp, tmp_path)


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img and qemu-io")
def test_force_replaces_a_stale_qcow2_whole(served: Served, tmp_path: Path) -> None:
    """The README routine a week later: mon.qcow2 still holds last Monday's clusters. An
    incremental with --force must not let any of them through its backing chain."""
    qmp, image = served.qmp, tmp_path / "disk.img"
    full, mon = tmp_path / "full.qcow2", tmp_path / "mon.qcow2"
    bb("backup", "--connect", qmp, "disk", str(full), "--format", "qcow2",
       "--start-bitmap", "nightly")  # fmt: skip
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(mon), "8M"], check=True)
    subprocess.run(  # last week's data, where this week nothing changes
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(mon)],
        check=True,
        capture_output=True,
    )
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", served.uri],
                   check=True, capture_output=True)  # fmt: skip
    args = ["--format", "qcow2", "--backing", str(full), "--incremental", "nightly"]
    run = bb("backup", "--connect", qmp, "disk", str(mon), *args, check=False)
    assert run.returncode == 2
    assert "exists" in one_line(run.stderr)
    bb("backup", "--connect", qmp, "disk", str(mon), *args, "--force")
    subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(mon), str(image)], check=True
    )
    assert_clean(qmp, tmp_path)


def test_the_source_is_never_its_own_target(served: Served, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    before = image.read_bytes()
    (tmp_path / "link.img").symlink_to(image)
    os.link(image, tmp_path / "hard.img")
    for name in ("disk.img", "link.img", "hard.img"):
        run = bb("backup", "--connect", served.qmp, "disk", str(tmp_path / name), "--force",
                 check=False)  # fmt: skip
        assert run.returncode == 2
        assert f"{name} is the source image itself" in one_line(run.stderr)
    assert image.read_bytes() == before
    assert_clean(served.qmp, tmp_path)


def test_no_image_the_daemon_has_open_is_a_target(tmp_path: Path) -> None:
    disk, other = tmp_path / "disk.img", tmp_path / "other.img"
    random_image(disk, 4 * MiB)
    kept = random_image(other, 4 * MiB)
    with serving([disk, other], tmp_path / "run") as s:
        run = bb("backup", "--connect", s.qmp, "disk", str(other), "--force", check=False)
        assert run.returncode == 2
        assert "an image the daemon has open (node other)" in one_line(run.stderr)
        assert other.read_bytes() == kept
        assert_clean(s.qmp, tmp_path)


def test_the_backup_gets_its_name_only_when_complete(served: Served, tmp_path: Path) -> None:
    target = tmp_path / "backup.img"
    proc = start("backup", "--connect", served.qmp, "disk", str(target), "--speed", "4M",
                 "--json")  # fmt: skip
    try:
        wait_until(lambda: running_job(served.qmp, 0.25), "a quarter of the backup")
        (partial,) = partials(tmp_path)
        assert partial.startswith(".backup.img.partial-bb-")
        assert not target.exists()
        inode = os.stat(tmp_path / partial).st_ino
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["status"] == "completed"
    assert os.stat(target).st_ino == inode  # renamed, not copied
    assert target.read_bytes() == (tmp_path / "disk.img").read_bytes()
    assert_clean(served.qmp, tmp_path)


def test_a_killed_daemon_leaves_no_backup_and_no_traceback(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 8 * MiB)
    target = tmp_path / "backup.img"
    with serving([image], tmp_path / "run") as s:
        proc = start("backup", "--connect", s.qmp, "disk", str(target), "--speed", "1M")
        try:
            wait_until(lambda: running_job(s.qmp, 0.1), "the backup to run")
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait(timeout=30)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1
    assert "lost the connection to the daemon" in one_line(err)
    assert not target.exists()
    assert partials(tmp_path) == []
    run = bb("jobs", "--connect", s.qmp, check=False)  # and after: one line, no traceback
    assert run.returncode == 1
    assert "connection refused" in one_line(run.stderr)


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_next_weeks_full_backup_restarts_the_bitmap(served: Served, tmp_path: Path) -> None:
    def dirty() -> list[int]:
        rows = json.loads(bb("bitmaps", "--connect", served.qmp, "list", "--json").stdout)
        return [r["count"] for r in rows if r.get("name") == "nightly"]

    bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "week1.img"),
       "--start-bitmap", "nightly")  # fmt: skip
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", served.uri],
                   check=True, capture_output=True)  # fmt: skip
    assert dirty() == [65536]
    bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "week2.img"),
       "--start-bitmap", "nightly")  # fmt: skip
    assert dirty() == [0]
    assert_clean(served.qmp, tmp_path)
