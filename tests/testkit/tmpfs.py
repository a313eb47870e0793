"""A real tmpfs of a given size, for tests of a full disk (ENOSPC from the kernel itself).

Why a mount and not a fault rule: a full file system also keeps the space of an unlinked
file while someone holds it open, which is exactly what a leak of an fd shows up as.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "64m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path`` (created); skip the test if not permitted.

    Unmounting at the end fails (and so fails the test) if a file on it is still open.
    """
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        res = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
            raise AssertionError(f"tmpfs {path} still busy: {res.stderr.decode().strip()}")
