"""``blockbackup gc`` as a user runs it: summary, JSON, dry run, a killed backup's marker,
and the mistakes (one line on stderr, exit 1)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from pathlib import Path

from testkit import repocli

BB = repocli.BB
MiB = 1 << 20
ENV = {**os.environ, "BBP": "the passphrase"}
SECRET = ("--passphrase-env", "BBP")
HOLD = Path(__file__).parent / "holdcommit"


bb = functools.partial(repocli.bb, env=ENV, timeout=120)


js = repocli.js


def files(root: Path, sub: str) -> list[Path]:
    """Objects under ``sub`` (not a writer's temporary files)."""
    if not (root / sub).exists():
        return []
    return sorted(p for p in (root / sub).rglob("*") if p.is_file() and ".tmp-" not in p.name)


def test_gc_frees_what_prune_left_and_reports_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    bb("repo", "init", repo, *SECRET)
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(2 * MiB))
    bb("backup", img, "--repo", repo, *SECRET)
    img.write_bytes(os.urandom(2 * MiB))
    second = js(bb("backup", img, "--repo", repo, *SECRET, "--json"))["snapshot"]
    assert files(repo, "writers") == []  # each backup retired its marker
    bb("prune", "--repo", repo, "--keep-last", "1", *SECRET)
    dry = js(bb("gc", "--repo", repo, *SECRET, "--json", "--dry-run"))
    assert dry["dry_run"]
    assert dry["condemned"] == 1
    packs = files(repo, "data")
    assert len(packs) == 2
    text = bb("gc", "--repo", repo, *SECRET).stdout
    assert text.startswith("2 packs: 1 deleted (")
    assert "bytes freed), 1 condemned" in text
    assert len(files(repo, "data")) == 1
    again = js(bb("gc", "--repo", repo, *SECRET, "--json"))
    assert (again["deleted"], again["condemned"], again["kept"]) == (0, 0, 1)
    out = tmp_path / "out.img"
    bb("restore", "--repo", repo, second, out, *SECRET)
    assert out.read_bytes() == img.read_bytes()
    assert js(bb("verify", "--repo", repo, *SECRET, "--json"))["ok"]


def test_gc_removes_the_verify_record_of_a_pack_it_deletes(tmp_path: Path) -> None:
    """``verified/<pack>`` goes with its pack (a stale record would outlive its data) and
    the record of a kept pack stays."""
    repo = tmp_path / "repo"
    bb("repo", "init", repo, "--no-encryption")
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(2 * MiB))
    bb("backup", img, "--repo", repo)
    img.write_bytes(os.urandom(2 * MiB))
    bb("backup", img, "--repo", repo)
    bb("verify", "--repo", repo)
    assert len(files(repo, "verified")) == 2
    bb("prune", "--repo", repo, "--keep-last", "1")
    assert js(bb("gc", "--repo", repo, "--json"))["deleted"] == 1
    kept = {p.name for p in files(repo, "data")}
    assert {p.name for p in files(repo, "verified")} == kept


def test_a_killed_backups_marker_is_removed_and_its_data_freed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    bb("repo", "init", repo, "--no-encryption")
    img = tmp_path / "big.img"
    img.write_bytes(os.urandom(48 * MiB))
    held = tmp_path / "held"
    # the backup stops just before its commit (its data stored): killed there, never late
    hold = {**ENV, "PYTHONPATH": str(HOLD), "BB_TEST_HELD": str(held)}
    proc = subprocess.Popen(
        [*BB, "backup", str(img), "--repo", str(repo)], stdin=subprocess.DEVNULL, env=hold
    )
    deadline = time.monotonic() + 120
    while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.exists(), "the backup never reached its commit"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    markers = files(repo, "writers")
    assert len(markers) == 1  # announced, never retired
    assert files(repo, "data")
    report = js(bb("gc", "--repo", repo, "--json"))
    assert [w["id"] for w in report["removed_writers"]] == [markers[0].name]
    assert files(repo, "writers") == []
    assert report["deleted"] >= 1, report
    assert files(repo, "data") == []


def test_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert "not a blockbackup repository" in bb("gc", "--repo", tmp_path, ok=False).stderr
    bb("repo", "init", repo, *SECRET)
    assert "is encrypted" in bb("gc", "--repo", repo, ok=False).stderr
    err = bb("gc", "--repo", repo, *SECRET, "--forget-writer", "0123", ok=False).stderr
    assert "no writer marker '0123'" in err
