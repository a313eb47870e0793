"""``serve --daemonize --pidfile``: the command returns once the daemon serves, with its URIs;
an error before that is the command's error; the pidfile is locked and goes at exit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from testkit.serving import MiB, bb, one_line_error, pid_gone, wait_until


def daemonized(tmp_path: Path, *extra: str) -> tuple[dict[str, object], int, Path]:
    """Start a daemonized serve of a new image; (what it printed, its pid, the pidfile)."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 * MiB))
    pidfile = tmp_path / "serve.pid"
    started = bb(
        "serve", str(image), "--dir", str(tmp_path / "run"), "--daemonize",
        "--pidfile", str(pidfile), "--json", *extra,
    )  # fmt: skip
    assert started.stderr == ""
    return json.loads(started.stdout), int(pidfile.read_text()), pidfile


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: pid_gone(pid), "the daemon to exit")


def test_returns_once_serving(tmp_path: Path) -> None:
    info, pid, pidfile = daemonized(tmp_path)
    try:
        assert not pid_gone(pid)
        # ready when the command returned: no waiting for the sockets
        assert json.loads(bb("jobs", "--connect", str(info["qmp"]), "--json").stdout) == []
        # the pidfile is locked: a second daemon with it is refused, in one line
        other = tmp_path / "other.img"
        other.write_bytes(bytes(MiB))
        second = bb(
            "serve", str(other), "--dir", str(tmp_path / "run2"), "--daemonize",
            "--pidfile", str(pidfile), check=False,
        )  # fmt: skip
        assert one_line_error(second) == (
            f"blockbackup serve: PID file {pidfile} is locked by pid {pid}: is a daemon running?"
        )
        assert int(pidfile.read_text()) == pid
    finally:
        stop(pid)
    assert not pidfile.exists()
    assert list((tmp_path / "run").iterdir()) == []


def test_prints_the_uris_as_in_the_foreground(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    started = bb("serve", str(image), "--dir", str(tmp_path / "run"), "--daemonize")
    run_dir = tmp_path / "run"
    assert started.stdout.splitlines() == [
        f"QMP monitor: {run_dir / 'qmp.sock'}",
        f"disk: nbd+unix:///disk?socket={run_dir / 'nbd.sock'}",
    ]
    lock = (run_dir / "serve.lock").read_text()
    stop(int(lock))
    assert list(run_dir.iterdir()) == []


def test_an_error_before_ready_is_the_commands_error(tmp_path: Path) -> None:
    _, pid, _ = daemonized(tmp_path)
    try:
        # the directory is busy: found by the daemon after the fork, said by the command
        image = tmp_path / "other.img"
        image.write_bytes(bytes(MiB))
        pidfile = tmp_path / "other.pid"
        busy = bb(
            "serve", str(image), "--dir", str(tmp_path / "run"), "--daemonize",
            "--pidfile", str(pidfile), check=False,
        )  # fmt: skip
        assert "is in use by another blockbackup serve" in one_line_error(busy)
        assert not pidfile.exists()
        # an error of the daemon itself: a qcow2 header it cannot open
        broken = tmp_path / "broken.qcow2"
        broken.write_bytes(b"QFI\xfb\0\0\0\x63" + bytes(MiB))
        bad = bb(
            "serve", str(broken), "--dir", str(tmp_path / "run3"), "--daemonize",
            "--pidfile", str(pidfile), check=False,
        )  # fmt: skip
        assert bad.returncode != 0
        assert bad.stderr.strip()
        assert "Traceback" not in bad.stderr
        assert not pidfile.exists()
        assert not (tmp_path / "run3" / "qmp.sock").exists()
    finally:
        stop(pid)
