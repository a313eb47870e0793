"""The installed ``blockbackup`` run as a user runs it: ``serve`` in the background, the other
commands to completion, and bounded polling for what happens in another process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

BB = [sys.executable, "-m", "blockbackup"]
MiB = 1 << 20


def bb(
    *args: str, check: bool = True, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``blockbackup ARGS`` to completion."""
    return subprocess.run(
        [*BB, *args], capture_output=True, text=True, check=check, timeout=timeout, env=env
    )


def one_line_error(run: subprocess.CompletedProcess[str], command: str = "serve") -> str:
    """Assert that ``run`` failed as a user error: exit 1, one line on stderr, no traceback;
    returns that line."""
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"blockbackup {command}: "), lines[0]
    return lines[0]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``condition`` until it holds (bounded: fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pid_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@dataclass
class Served:
    """A running ``blockbackup serve`` and what it printed (``--json``)."""

    proc: subprocess.Popen[str]
    info: dict[str, Any]

    @property
    def qmp(self) -> str:
        return str(self.info["qmp"])

    def uri(self, n: int = 0) -> str:
        return str(self.info["exports"][n]["uri"])

    def stop(self, sig: signal.Signals = signal.SIGINT) -> tuple[int, str]:
        """Signal serve and wait for it: (exit status, what it wrote on stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


def start_serve(*args: str, env: Mapping[str, str] | None = None) -> Served:
    """Start ``blockbackup serve ARGS --json`` and wait until it serves."""
    proc = subprocess.Popen(
        [*BB, "serve", *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"serve exited {proc.returncode} before serving: {err}")
    return Served(proc, json.loads(line))


@contextmanager
def serving(*args: str, env: Mapping[str, str] | None = None) -> Iterator[Served]:
    """``serve ARGS`` for the block; stopped with Ctrl-C after it, which must exit 0 cleanly."""
    served = start_serve(*args, env=env)
    try:
        yield served
    finally:
        code, err = served.stop()
    assert code == 0, err
    assert "Traceback" not in err, err


def tmpdir_env(path: os.PathLike[str] | str) -> dict[str, str]:
    """The environment with ``TMPDIR`` (where serve makes its temporary directory) set."""
    return {**os.environ, "TMPDIR": os.fspath(path)}
