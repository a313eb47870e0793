"""``mount --writable``: a VM-bootable, throw-away view of a snapshot. Writes through NBD
land in an overlay (read back through NBD), the repository stays byte-for-byte as it was,
the snapshot still restores exactly, and the overlay goes at Ctrl-C or SIGTERM unless
--keep-overlay keeps it. qemu-img and nbdinfo work against both kinds of mount."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

BB = [sys.executable, "-m", "blockbackup"]
MiB = 1 << 20
ENV = {**os.environ, "BBP": "the passphrase"}
KEY = ("--passphrase-env", "BBP")

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo")),
    reason="needs qemu-img, qemu-io and nbdinfo",
)


def bb(*args: str | Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*BB, *map(str, args)], capture_output=True, text=True, env=ENV,
        stdin=subprocess.DEVNULL, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


def tree(root: Path) -> dict[str, str]:
    """Every file of the repository and its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@contextmanager
def mounted(
    repo: Path, *extra: str, stop: signal.Signals = signal.SIGINT
) -> Iterator[dict[str, Any]]:
    with subprocess.Popen(
        [*BB, "mount", "--repo", str(repo), "latest", *KEY, "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            yield json.loads(line)
        finally:
            proc.send_signal(stop)
            assert proc.wait(timeout=60) == 0


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, bytes]:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    data = bytearray(os.urandom(4 * MiB))
    data[MiB : 2 * MiB] = bytes(MiB)
    disk.write_bytes(bytes(data))
    bb("repo", "init", repo, *KEY)
    bb("backup", disk, "--repo", repo, *KEY)
    return repo, bytes(data)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_writes_land_in_a_throw_away_overlay(
    tmp_path: Path, backed_up: tuple[Path, bytes], stop: signal.Signals
) -> None:
    repo, data = backed_up
    before = tree(repo)
    with mounted(repo, "--writable", stop=stop) as info:
        assert info["writable"] is True
        assert info["keep_overlay"] is False
        overlay = Path(info["overlay"])
        assert overlay.exists()
        uri = info["uri"]
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 12288",
            "-c", "write -P 0xa5 1572864 65536", uri)  # fmt: skip
        run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 4096 12288",
            "-c", "read -P 0xa5 1572864 65536", "-c", "read -P 0 1048576 65536", uri)  # fmt: skip
        assert "export-size: 4194304" in run("nbdinfo", uri).stdout
        assert json.loads(run("qemu-img", "info", "--output=json", uri).stdout)[
            "virtual-size"
        ] == len(data)
        seen = tmp_path / "seen.img"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(seen))
        expected = bytearray(data)
        expected[4096 : 4096 + 12288] = b"\x5a" * 12288
        expected[1572864 : 1572864 + 65536] = b"\xa5" * 65536
        assert seen.read_bytes() == bytes(expected)
    assert not overlay.exists()
    assert not overlay.parent.exists()  # its private directory too
    assert tree(repo) == before  # the repository was never written
    assert json.loads(bb("verify", "--repo", repo, *KEY, "--json").stdout)["ok"]
    out = tmp_path / "out.img"
    bb("restore", "--repo", repo, "latest", out, *KEY)
    assert out.read_bytes() == data


def test_keep_overlay_keeps_the_changes(tmp_path: Path, backed_up: tuple[Path, bytes]) -> None:
    repo, data = backed_up
    keep = tmp_path / "changes.qcow2"
    with mounted(repo, "--writable", "--keep-overlay", str(keep)) as info:
        assert info["overlay"] == str(keep)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 65536", info["uri"])
    assert keep.exists()
    assert json.loads(run("qemu-img", "info", "--output=json", str(keep)).stdout)["format"] == (
        "qcow2"
    )
    # the kept overlay rebased onto a restore of the snapshot is the written disk
    base = tmp_path / "base.img"
    bb("restore", "--repo", repo, "latest", base, *KEY)
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", "raw", str(keep))
    whole = tmp_path / "whole.img"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(keep), str(whole))
    assert whole.read_bytes() == b"\x33" * 65536 + data[65536:]
    again = bb("mount", "--repo", repo, "latest", *KEY, "--writable", "--keep-overlay", keep,
               code=1)  # fmt: skip
    assert "exists" in again.stderr
    assert again.stderr.count("\n") == 1
    alone = bb("mount", "--repo", repo, "latest", *KEY, "--keep-overlay", tmp_path / "x", code=1)
    assert "--keep-overlay needs --writable" in alone.stderr


def test_read_only_mount_works_with_qemu_img_and_nbdinfo(
    tmp_path: Path, backed_up: tuple[Path, bytes]
) -> None:
    repo, data = backed_up
    original = tmp_path / "original.img"
    original.write_bytes(data)
    with mounted(repo) as info:
        assert info["writable"] is False
        assert info["overlay"] is None
        (export,) = json.loads(run("nbdinfo", "--json", info["uri"]).stdout)["exports"]
        assert export["export-size"] == len(data)
        assert export["is_read_only"] is True
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", info["uri"], str(original))
