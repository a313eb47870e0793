"""Helpers for the qcow2 tests: running qemu tools and opening images."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")


def run(*args: str | Path) -> str:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


def qemu_io(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, img)
    assert "error" not in out.lower(), out
    assert "failed" not in out.lower(), out


def to_raw(img: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-U", "-O", "raw", img, out)
    return out.read_bytes()


def check_clean(img: Path) -> None:
    """qemu-img check: no errors, no leaks."""
    res = subprocess.run(
        ["qemu-img", "check", str(img)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found" in res.stdout, res.stdout
    assert "leaked" not in res.stdout, res.stdout


def qcow2_opts(path: Path, name: str = "q", **extra: Any) -> dict[str, Any]:
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }
