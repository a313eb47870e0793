"""The ``backup``, ``jobs`` and ``bitmaps`` commands as a user runs them, and what they leave.

Every command runs as the installed ``blockbackup`` script in a subprocess; the daemon's
state afterwards is read with QEMU's own QMP client (``query-jobs``,
``query-named-block-nodes``), and the files with ``os``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

#: The console script installed next to the interpreter running the tests.
BLOCKBACKUP = str(Path(sys.executable).with_name("blockbackup"))
MiB = 1 << 20
#: What must never reach a user's terminal.
NOISE = ("Traceback", "Task was destroyed", "GeneratorExit", "was never retrieved")


def bb(
    *args: str, check: bool = True, prefix: Sequence[str] = (), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``blockbackup ARGS`` to the end (``prefix``: e.g. a setpriv command line)."""
    run = subprocess.run(
        [*prefix, BLOCKBACKUP, *args], capture_output=True, text=True, timeout=timeout
    )
    assert_no_noise(run.stderr)
    if check and run.returncode != 0:
        raise AssertionError(f"blockbackup {' '.join(args)}: exit {run.returncode}\n{run.stderr}")
    return run


def start(*args: str, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Start ``blockbackup ARGS`` in the background, output captured."""
    return subprocess.Popen(
        [*prefix, BLOCKBACKUP, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_no_noise(stderr: str) -> None:
    for word in NOISE:
        assert word not in stderr, stderr


def one_line(stderr: str) -> str:
    """The single line a user error is reported as."""
    assert_no_noise(stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@dataclass
class Served:
    """A running ``blockbackup serve``."""

    qmp: str
    exports: list[dict[str, Any]]
    proc: subprocess.Popen[str]
    stderr_path: Path

    @property
    def uri(self) -> str:
        return str(self.exports[0]["uri"])

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@contextmanager
def serving(
    images: Sequence[Path], run_dir: Path, *, prefix: Sequence[str] = ()
) -> Iterator[Served]:
    """``blockbackup serve IMAGES --dir RUN_DIR`` until the block ends (or it was killed)."""
    err_path = run_dir.with_name(run_dir.name + ".stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [*prefix, BLOCKBACKUP, "serve", *map(str, images), "--dir", str(run_dir), "--json"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"serve did not start: {err_path.read_text()}"
        info = json.loads(line)
        yield Served(info["qmp"], info["exports"], proc, err_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def qmp(socket: str, command: str, args: dict[str, Any] | None = None) -> Any:
    """One QMP command on its own connection (retried while the monitor's backlog is full:
    asyncio then reports EINVAL, see ``blockbackup.cli.qmpclient.connect``)."""

    async def go() -> Any:
        client = QMPClient("test")
        await client.connect(socket)
        try:
            return await client.execute(command, args)
        finally:
            await client.disconnect()

    deadline = time.monotonic() + 30
    while True:
        try:
            return asyncio.run(go())
        except ConnectError as err:
            busy = isinstance(err.exc, OSError) and err.exc.errno in (errno.EAGAIN, errno.EINVAL)
            if not busy or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def jobs(socket: str) -> list[dict[str, Any]]:
    return list(qmp(socket, "query-jobs"))


def node_names(socket: str) -> list[str]:
    return [str(n["node-name"]) for n in qmp(socket, "query-named-block-nodes")]


def partials(directory: Path) -> list[str]:
    """The partial files a backup writes before the target gets its name."""
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def assert_clean(socket: str, *directories: Path) -> None:
    """No job, no node a backup made, no partial file: nothing left behind."""
    assert jobs(socket) == []
    assert [n for n in node_names(socket) if n.startswith("bb-")] == []
    for directory in directories:
        assert partials(directory) == []


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``predicate`` until it is truthy (bounded); its value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def running_job(socket: str, at_least: float = 0.0) -> dict[str, Any] | None:
    """The one running job once its progress reached ``at_least`` (a fraction), else None."""
    for job in jobs(socket):
        total = job.get("total-progress") or 0
        if job["status"] == "running" and total and job["current-progress"] >= at_least * total:
            return dict(job)
    return None


def random_image(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data
