"""The long repository commands show progress on a terminal (stderr a pty) and print only
their JSON with --json; the JSON shape of each command."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

BB = [sys.executable, "-m", "blockbackup"]
MiB = 1 << 20
ENV = {**os.environ, "BBP": "the passphrase", "NEW": "another", "COLUMNS": "100"}
KEY = ("--passphrase-env", "BBP")


def on_terminal(*args: str | Path) -> str:
    """Run with stderr on a pseudo-terminal; what it showed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*BB, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=slave, env=ENV,
    )  # fmt: skip
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert proc.wait(timeout=120) in (0, 1)
    return shown.decode(errors="replace")


def as_json(*args: str | Path) -> Any:
    proc = subprocess.run(
        [*BB, *map(str, args), "--json"], capture_output=True, text=True, env=ENV,
        stdin=subprocess.DEVNULL, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no bar, no note
    return json.loads(proc.stdout)  # one document, nothing else


def test_progress_on_a_terminal_and_json_shapes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 * MiB))
    init = as_json("repo", "init", repo, *KEY)
    assert set(init) == {"repository", "id", "encryption"}
    backup = as_json("backup", disk, "--repo", repo, *KEY)
    assert {"snapshot", "disk", "size", "stored_chunks", "stored_bytes", "reused_chunks"} <= set(
        backup
    )
    assert "backup disk.img" in on_terminal("backup", disk, "--repo", repo, *KEY)

    (row, _) = as_json("snapshots", "--repo", repo, *KEY)
    assert {"id", "time", "host", "disks"} <= set(row)
    assert "read snapshots" in on_terminal("snapshots", "--repo", repo, *KEY)

    restored = as_json("restore", "--repo", repo, "latest", tmp_path / "a.img", *KEY)
    assert set(restored) == {"disk", "size", "out", "snapshot", "requests"}
    assert "restore disk.img" in on_terminal(
        "restore", "--repo", repo, "latest", tmp_path / "b.img", *KEY
    )

    verified = as_json("verify", "--repo", repo, *KEY)
    assert {"ok", "snapshots", "chunks", "packs", "damage", "damaged_snapshots", "skipped"} <= set(
        verified
    )
    shown = on_terminal("verify", "--repo", repo, *KEY)
    assert "read snapshots" in shown
    assert "verify" in shown

    pruned = as_json("prune", "--repo", repo, "--keep-last", "1", *KEY)
    assert set(pruned) == {"kept", "removed", "dry_run", "damaged"}
    assert "read snapshots" in on_terminal("prune", "--repo", repo, "--keep-last", "1", *KEY)
    collected = as_json("gc", "--repo", repo, *KEY)
    assert {"deleted", "condemned", "kept", "freed_bytes", "dry_run"} <= set(collected)
    shown = on_terminal("gc", "--repo", repo, *KEY)
    assert "gc " in shown
    assert any(step in shown for step in ("reading snapshots", "marking", "checking packs"))

    added = as_json("repo", "key", "add", "--repo", repo, *KEY, "--new-passphrase-env", "NEW")
    assert set(added) == {"slot", "kind", "kdf"}
    slots = as_json("repo", "key", "list", "--repo", repo)
    assert {"slot", "kind", "kdf", "created", "comment"} == set(slots[0])
    removed = as_json("repo", "key", "remove", "--repo", repo, added["slot"], *KEY)
    assert removed == {"removed": added["slot"]}


def test_mount_says_it_is_opening_on_a_terminal(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(MiB))
    as_json("repo", "init", repo, *KEY)
    as_json("backup", disk, "--repo", repo, *KEY)
    master, slave = pty.openpty()
    with subprocess.Popen(
        [*BB, "mount", "--repo", str(repo), "latest", *KEY], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=slave, env=ENV, text=True,
    ) as proc:  # fmt: skip
        os.close(slave)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("snapshot ")  # ready: the URI
            shown = os.read(master, 65536).decode(errors="replace")
            assert "mount: opening snapshot" in shown
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
            os.close(master)
