"""Change tracking survives SIGKILL, end to end: rounds of NBD writes, kill, restart, incremental.

The daemon (``blockbackup serve``) exports a raw image with a persistent bitmap started at a
full backup's point in time. Each round a real NBD client (qemu-io) writes at random, the
daemon is killed with SIGKILL at a random moment, restarted (the bitmap loads from its
sidecar), and an incremental backup goes into a qcow2 backed by the previous backup. The
chain, read by ``qemu-img compare``, must equal the image every round: no write that reached
the image was lost from tracking.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io and qemu-img"),
]
BB = [sys.executable, "-m", "blockbackup"]
MiB = 1 << 20
SIZE = 16 * MiB
ROUNDS = int(os.environ.get("BLOCKBACKUP_CRASH_ROUNDS", "4"))


@contextmanager
def serve(image: Path, run_dir: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    with subprocess.Popen(
        [*BB, "serve", str(image), "--dir", str(run_dir), "--json"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        proc.stdout.close()
        try:
            yield proc, info
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)


def bb(*args: str) -> dict[str, Any]:
    run = subprocess.run([*BB, *args, "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def test_bitmap_survives_sigkill_rounds(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("BB_CRASH_SEED", "11")))
    image = tmp_path / "disk.img"
    image.write_bytes(rng.randbytes(SIZE))
    previous = tmp_path / "full.qcow2"
    with serve(image, tmp_path / "run0") as (_, info):
        bb("backup", "--connect", info["qmp"], "disk", str(previous), "--format", "qcow2",
           "--start-bitmap", "nightly", "--persistent")  # fmt: skip
    for round_ in range(1, ROUNDS + 1):
        with serve(image, tmp_path / f"run{round_}a") as (daemon, info):
            writes: list[str] = []
            for _ in range(300):
                offset = rng.randrange(SIZE // 512 - 64) * 512
                length = rng.choice([512, 4096, 65536, 20480])
                writes += ["-c", f"write -P {rng.randrange(1, 255)} {offset} {length}"]
            with subprocess.Popen(
                ["qemu-io", "-f", "raw", info["exports"][0]["uri"], *writes],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ) as writer:
                time.sleep(rng.uniform(0.05, 0.6))
                daemon.send_signal(signal.SIGKILL)  # mid-write, no chance to store anything
                daemon.wait(timeout=30)
                writer.wait(timeout=30)
        link = tmp_path / f"inc{round_}.qcow2"
        with serve(image, tmp_path / f"run{round_}b") as (_, info):
            listed = bb("bitmaps", "--connect", info["qmp"], "list")
            assert [(b["name"], b["persistent"]) for b in listed] == [("nightly", True)]  # type: ignore[index]
            assert not any(b.get("inconsistent") for b in listed)  # type: ignore[attr-defined]
            result = bb(
                "backup", "--connect", info["qmp"], "disk", str(link), "--format", "qcow2",
                "--backing", str(previous), "--incremental", "nightly", "--job-id", f"inc{round_}",
            )  # fmt: skip
            assert result["error"] is None
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(link), str(image)],
            capture_output=True,
            text=True,
        )
        assert compare.returncode == 0, f"round {round_}: {compare.stdout}{compare.stderr}"
        previous = link
