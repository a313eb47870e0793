"""The user commands as a user runs them: ``serve``, ``backup``, ``jobs``, and the demo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockbackup.demo_e2e import BLOCK, BlockLog, payload, verify

BB = [sys.executable, "-m", "blockbackup"]
MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[dict[str, Any], Path]]:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(8 * MiB))
    with subprocess.Popen(
        [*BB, "serve", str(image), "--dir", str(tmp_path / "run"), "--json"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            proc.stdout.close()  # nothing more is printed with --json
            yield info, image
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
    assert not (tmp_path / "run" / "qmp.sock").exists()


def bb(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BB, *args], capture_output=True, text=True, check=check, timeout=60)


def test_serve_prints_uris_and_owner_only_sockets(served: tuple[dict[str, Any], Path]) -> None:
    info, _ = served
    assert info["exports"][0]["node"] == "disk"
    sock = info["exports"][0]["uri"].split("socket=")[1]
    assert info["exports"][0]["uri"] == f"nbd+unix:///disk?socket={sock}"
    assert os.stat(info["qmp"]).st_mode & 0o777 == 0o600
    assert os.stat(sock).st_mode & 0o777 == 0o600


def test_backup_and_jobs(served: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    info, image = served
    target = tmp_path / "backup.img"
    result = json.loads(
        bb("backup", "--connect", info["qmp"], "disk", str(target), "--json").stdout
    )
    assert result["status"] == "completed"
    assert result["error"] is None
    assert result["len"] == 8 * MiB
    assert target.read_bytes() == image.read_bytes()
    assert json.loads(bb("jobs", "--connect", info["qmp"], "--json").stdout) == []
    table = bb("jobs", "--connect", info["qmp"]).stdout
    assert table == "no jobs\n"  # says so, rather than an empty table
    # the target node was removed again: a second backup to a new file works
    bb("backup", "--connect", info["qmp"], "disk", str(tmp_path / "b2.img"), "--json")


def test_backup_errors_exit_non_zero(served: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    info, _ = served
    run = bb("backup", "--connect", info["qmp"], "nosuch", str(tmp_path / "x.img"), check=False)
    assert run.returncode == 1
    assert "Cannot find device='nosuch' nor node-name='nosuch'" in run.stderr
    run = bb("backup", "--connect", str(tmp_path / "no.sock"), "disk", "x.img", check=False)
    assert run.returncode == 1
    assert "cannot connect" in run.stderr


def test_ctrl_c_cancels_the_job(served: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    info, _ = served
    slow = str(tmp_path / "slow.img")
    argv = [*BB, "backup", "--connect", info["qmp"], "disk", slow, "--speed", "64K", "--json"]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 30
        while not json.loads(bb("jobs", "--connect", info["qmp"], "--json").stdout):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    assert json.loads(bb("jobs", "--connect", info["qmp"], "--json").stdout) == []


def test_serve_refuses_a_missing_image(tmp_path: Path) -> None:
    run = bb("serve", str(tmp_path / "missing.img"), check=False)
    assert run.returncode == 1
    assert "no such image" in run.stderr


def test_demo_end_to_end(tmp_path: Path) -> None:
    run = bb("demo", "--size", "16M", "--dir", str(tmp_path))
    assert "OK: the backup equals the image at the moment the backup started" in run.stdout


def test_demo_proof_rejects_an_inconsistent_backup() -> None:
    """Block 0 shows a write that completed after block 1's newer write: no single T0."""
    original = bytes(4 * BLOCK)
    logs = {0: BlockLog([(1.0, 2.0)]), 1: BlockLog([(0.0, 0.5), (0.6, 0.7)])}
    backup = bytearray(original)
    backup[0:BLOCK] = payload(0, 1)  # block 0 at version 1: T0 >= 1.0
    backup[BLOCK : 2 * BLOCK] = payload(1, 1)  # block 1 at version 1: T0 < 0.7
    with pytest.raises(AssertionError, match="no single point in time"):
        verify(original, bytes(backup), logs)
    backup[BLOCK : 2 * BLOCK] = payload(1, 2)  # consistent now: T0 >= 1.0
    assert verify(original, bytes(backup), logs) == (1.0, float("inf"))
    backup[2 * BLOCK] ^= 1  # a byte that is no version at all
    with pytest.raises(AssertionError, match="neither the original nor an exact version"):
        verify(original, bytes(backup), logs)


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-img and qemu-io")
def test_nightly_full_plus_incrementals(
    served: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """The README's routine: a full backup that starts a bitmap, then incrementals into
    qcow2 images each backed by the previous one; every chain equals the image."""
    info, image = served
    qmp = info["qmp"]
    full, inc1, inc2 = (str(tmp_path / n) for n in ("full.qcow2", "inc1.qcow2", "inc2.qcow2"))
    bb("backup", "--connect", qmp, "disk", full, "--format", "qcow2", "--start-bitmap", "nightly")
    listed = json.loads(bb("bitmaps", "--connect", qmp, "list", "--json").stdout)
    assert [(b["node"], b["name"], b["count"]) for b in listed] == [("disk", "nightly", 0)]
    previous = full
    for n, link in enumerate((inc1, inc2)):
        writes = [  # the "guest" changes 3 clusters' worth, over NBD
            arg
            for offset in (n * 65536, 3 * MiB + n * 4096, 7 * MiB - 4096)
            for arg in ("-c", f"write -P {0x40 + n} {offset} 4k")
        ]
        subprocess.run(["qemu-io", "-f", "raw", info["exports"][0]["uri"], *writes], check=True)
        args = ["--format", "qcow2", "--backing", previous, "--incremental", "nightly"]
        result = json.loads(
            bb(
                "backup", "--connect", qmp, "disk", link, *args, "--job-id", f"inc{n}", "--json"
            ).stdout
        )
        assert result["len"] <= 3 * 65536
        subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", link, str(image)], check=True
        )
        previous = link
    bb("bitmaps", "--connect", qmp, "add", "disk", "b2")
    bb("bitmaps", "--connect", qmp, "remove", "disk", "b2")
    run = bb("bitmaps", "--connect", qmp, "remove", "disk", "nosuch", check=False)
    assert run.returncode == 1
    assert "Dirty bitmap 'nosuch' not found" in run.stderr
