"""Stopping ``serve`` (Ctrl-C or SIGTERM, as systemd stops it) stores its persistent dirty
bitmaps, with what the clients changed, so the next incremental backup holds it all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from testkit.serving import MiB, bb, serving, start_serve

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img and qemu-io"),
]


def write(uri: str, offset: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P 7 {offset} 64k", uri],
        check=True,
        capture_output=True,
    )


def bitmaps(qmp: str) -> list[tuple[str, int, bool]]:
    listed = json.loads(bb("bitmaps", "--connect", qmp, "list", "--json").stdout)
    return [(b["name"], b["count"], b["persistent"]) for b in listed]


def make_image(tmp_path: Path, fmt: str) -> Path:
    if fmt == "qcow2":
        image = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    else:
        image = tmp_path / "disk.img"
        image.write_bytes(os.urandom(8 * MiB))
    return image


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_stop_stores_persistent_bitmaps(tmp_path: Path, sig: signal.Signals, fmt: str) -> None:
    image = make_image(tmp_path, fmt)
    run_dir = str(tmp_path / "run")
    served = start_serve(str(image), "--dir", run_dir)
    try:
        bb("bitmaps", "--connect", served.qmp, "add", "disk", "b0", "--persistent")
        write(served.uri(), 0)
        write(served.uri(), 4 * MiB)
    finally:
        code, err = served.stop(sig)
    assert code == 0, err
    assert "Traceback" not in err
    if fmt == "qcow2":  # QEMU reads it too: stored, and not left "in use"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(image)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        stored = info["format-specific"]["data"]["bitmaps"]
        assert [(b["name"], b["flags"]) for b in stored] == [("b0", ["auto"])]
    with serving(str(image), "--dir", run_dir) as again:
        assert bitmaps(again.qmp) == [("b0", 128 * 1024, True)]
