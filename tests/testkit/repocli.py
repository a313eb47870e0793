"""The installed CLI as a user runs it (as a subprocess), and what a failure must look like."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

BB = [sys.executable, "-m", "blockbackup"]


def bb(
    *args: Any, env: dict[str, str], ok: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The installed CLI as a user runs it; a failure is one line, exit 1."""
    proc = subprocess.run(
        [*BB, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"blockbackup {args[0]}: "), proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    return proc


def js(proc: subprocess.CompletedProcess[str]) -> Any:
    """A ``--json`` command's output."""
    return json.loads(proc.stdout)
