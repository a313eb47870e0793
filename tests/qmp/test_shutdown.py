"""The daemon's exit: a final flush that fails is reported, never swallowed.

The installed ``blockbackup daemon`` runs as a subprocess with a ``blkdebug`` node whose
flushes fail (QEMU's ``flush_to_disk`` event). On SIGTERM the daemon flushes every image
before it exits: a failed flush means data it acknowledged may not be on disk, so the
person who runs it must learn it from its messages and its exit status.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

DAEMON = [sys.executable, "-m", "blockbackup", "daemon"]


def run_until_sigterm(tmp: Path, *blockdevs: str) -> subprocess.CompletedProcess[bytes]:
    """Start the daemon, wait (polling, bounded) until it serves, SIGTERM it, collect."""
    (tmp / "disk.img").write_bytes(bytes(1 << 20))
    sock = tmp / "qmp.sock"
    argv = [*DAEMON, "--pidfile", str(tmp / "pid")]
    for spec in blockdevs:
        argv += ["--blockdev", spec]
    argv += ["--chardev", f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "m0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (tmp / "pid").exists():  # written once every option is processed
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_failed_flush_at_exit_is_reported(tmp_path: Path) -> None:
    res = run_until_sigterm(
        tmp_path,
        f"driver=file,node-name=diskf,filename={tmp_path}/disk.img",
        "driver=blkdebug,node-name=flaky,image=diskf,"
        "inject-error.0.event=flush_to_disk,inject-error.0.errno=5",
    )
    assert res.returncode == 1, res.stderr
    err = res.stderr.decode()
    assert "Failed to flush node 'flaky' at close: Input/output error" in err
    assert "Traceback" not in err
    assert not (tmp_path / "pid").exists()  # still a complete, clean exit


def test_clean_exit_is_zero(tmp_path: Path) -> None:
    res = run_until_sigterm(
        tmp_path,
        f"driver=file,node-name=diskf,filename={tmp_path}/disk.img",
        "driver=blkdebug,node-name=fine,image=diskf",
    )
    assert (res.returncode, res.stderr) == (0, b"")
