"""A real block device (a loop device over a file), for tests of images that are devices.

Why a loop device: an LVM volume or a disk is what users back up at rest besides files,
and a block device behaves differently (no growth, no holes to seek, ``stat`` is not a
regular file); only the kernel's own device shows that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def attached_loop(backing: Path) -> Iterator[str]:
    """``backing`` attached as a loop device (its path); skip the test if not permitted."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    res = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        pytest.skip(f"no loop device: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
