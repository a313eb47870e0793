"""Cost of a persistent dirty bitmap for a guest writing through NBD, against no bitmap.

Why: the incremental issue's goal is stated for fio through an NBD export: a persistent
bitmap costs under 15% of 4 KiB random-write IOPS on a first pass over clean clusters and
nothing measurable on already-dirty ones. The in-process ``persistent_bitmap.py`` leaves out
the NBD path, where a gate that makes a write await costs it the server's inline path.

``blockbackup serve`` exports a fresh sparse raw image; ``blockbackup bitmaps add`` gives it
a bitmap (none, a plain one, a persistent one); fio's nbd engine writes 4 KiB blocks at
random (iodepth 16, fixed seed) twice for ``--runtime`` seconds: the second pass rewrites
what the first wrote (same seed). Modes alternate inside each round in a rotating order,
each pass after a ``sync``; the best of ``--repeat`` rounds is kept per mode and pass. The
goal's ratio is persistent against plain (a non-persistent bitmap); against none is shown too.

    .venv/bin/python benchmarks/persistent_bitmap_nbd.py [--size-gib 4] [--runtime 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCKBACKUP = [sys.executable, "-m", "blockbackup"]
MODES = ("none", "plain", "persistent")


def fio_iops(sock: Path, size_gib: int, runtime: int) -> float:
    out = subprocess.run(
        ["fio", "--name=guest", "--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}",
         "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size_gib}G",
         f"--runtime={runtime}", "--time_based", "--randseed=7", "--output-format=terse"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    line = next(row for row in out.splitlines() if row.count(";") > 50)
    return float(line.split(";")[48])  # terse v3: write IOPS


def one_mode(work: Path, mode: str, size_gib: int, runtime: int) -> tuple[float, float]:
    """(first pass IOPS, rewrite pass IOPS) for one bitmap mode on a fresh image."""
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    image = work / "disk.img"
    for stale in (image, work / "disk.img.bbmap"):
        stale.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_gib << 30)
    server = subprocess.Popen(
        [*BLOCKBACKUP, "serve", "--dir", str(run), str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            if (run / "nbd.sock").exists() and (run / "qmp.sock").exists():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("blockbackup serve did not start")
        if mode != "none":
            extra = ["--persistent"] if mode == "persistent" else []
            subprocess.run(
                [*BLOCKBACKUP, "bitmaps", "add", "disk", "b0", "--connect",
                 str(run / "qmp.sock"), *extra],
                check=True, capture_output=True,
            )  # fmt: skip
        passes = []
        for _ in range(2):
            os.sync()
            passes.append(fio_iops(run / "nbd.sock", size_gib, runtime))
        return passes[0], passes[1]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument("--runtime", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bb-pbm-nbd-"))
    best: dict[str, list[float]] = {mode: [0.0, 0.0] for mode in MODES}
    try:
        for r in range(args.repeat):
            for mode in MODES[r % 3 :] + MODES[: r % 3]:  # no mode always runs last
                first, rewrite = one_mode(work, mode, args.size_gib, args.runtime)
                print(f"  {mode:10} first pass {first:9.0f} IOPS   rewrites {rewrite:9.0f} IOPS")
                best[mode] = [max(best[mode][0], first), max(best[mode][1], rewrite)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    none, plain = best["none"], best["plain"]
    print(
        f"\nbest of {args.repeat}, fio 4 KiB randwrite QD16 through NBD, {args.size_gib} GiB image"
    )
    for mode in MODES:
        first, rewrite = best[mode]
        print(
            f"  {mode:10} first pass {first:9.0f} ({first / none[0]:.2f}x of none, "
            f"{first / plain[0]:.2f}x of plain)   rewrites {rewrite:9.0f} "
            f"({rewrite / none[1]:.2f}x of none, {rewrite / plain[1]:.2f}x of plain)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
