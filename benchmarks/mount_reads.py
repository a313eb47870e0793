"""Reading a mounted snapshot (instant recovery) against serving the same image as a file.

Why: a VM booted from a backup (``blockbackup mount``, with or without ``--writable``) reads
its disk through the snapshot node, in the small requests a guest sends, often 4 KiB. A
chunk is 64 KiB, so such reads ask for parts of one chunk again and again. The reference
is the same image served by ``blockbackup serve`` (plain file reads from the page cache):
the closer to it, the less a restore-free boot waits on the repository.

Both are read with ``qemu-img bench`` over NBD (a real client; queue depth 1 for a guest
waiting on each read, 8 for readahead), the repository's packs and the image warm in the
page cache, after one untimed pass. Prints seconds per pattern and the ratio mount/serve.

Usage::

    ./dev bench mount_reads [--size 256M]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
BB = [sys.executable, "-m", "blockbackup"]
PASSPHRASE = "mount benchmark passphrase"

#: name, request size, count, step (0: random offsets), queue depth
PATTERNS = [
    ("4 KiB sequential, depth 1", 4096, 8192, 4096, 1),
    ("4 KiB random, depth 1", 4096, 2048, 0, 1),
    ("64 KiB sequential, depth 1", 65536, 1024, 65536, 1),
    ("4 KiB sequential, depth 8", 4096, 8192, 4096, 8),
]


def make_image(path: Path, size: int) -> None:
    """Random data with a zero run in each 8 MiB (what a used disk looks like, roughly)."""
    rng = random.Random(7)
    with open(path, "wb") as f:
        for _ in range(0, size, 8 * MiB):
            f.write(rng.randbytes(6 * MiB) + bytes(2 * MiB))
    os.truncate(path, size)


def served(argv: list[str], env: dict[str, str], socket: Path) -> subprocess.Popen[bytes]:
    """Start a serving command; return once its NBD socket exists."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{' '.join(argv)} did not start: {proc.stderr.read()!r}")
        time.sleep(0.05)
    return proc


def bench(uri: str, size: int, request: int, count: int, step: int, depth: int) -> float:
    """Seconds for ``count`` reads; random offsets (``step`` 0) are request-aligned."""
    if step:
        return _qemu_img_bench(uri, request, count, step, depth, 0)
    rng = random.Random(11)
    total = 0.0
    for _ in range(count // 256):  # qemu-img bench has no random mode: 256 reads per run
        offset = rng.randrange(0, size - 256 * request) // request * request
        total += _qemu_img_bench(uri, request, 256, request * rng.choice((3, 17, 61)), 1, offset)
    return total


def _qemu_img_bench(uri: str, request: int, count: int, step: int, depth: int, at: int) -> float:
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-s", str(request)]
    argv += ["-S", str(step), "-d", str(depth), "-o", str(at), uri]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return float(out.rsplit("Run completed in ", 1)[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="256M", help="image size (K/M/G suffix)")
    opts = parser.parse_args()
    from blockbackup.cli.sizes import parse_size

    size = parse_size(opts.size)
    env = {**os.environ, "BB_PASSPHRASE": PASSPHRASE}
    with tempfile.TemporaryDirectory(prefix="bb-mount-bench-") as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        make_image(image, size)
        repo = work / "repo"
        secret = ["--passphrase-env", "BB_PASSPHRASE"]
        subprocess.run([*BB, "repo", "init", str(repo), *secret], env=env, check=True)
        subprocess.run(
            [*BB, "backup", str(image), "--repo", str(repo), *secret], env=env, check=True
        )
        (work / "serve").mkdir()
        (work / "mount").mkdir()
        sides = {
            "serve": (
                [*BB, "serve", str(image), "--dir", str(work / "serve")],
                f"nbd+unix:///disk?socket={work / 'serve' / 'nbd.sock'}",
            ),
            "mount": (
                [
                    *BB,
                    "mount",
                    "--repo",
                    str(repo),
                    "latest",
                    *secret,
                    "--dir",
                    str(work / "mount"),
                ],
                f"nbd+unix:///disk.img?socket={work / 'mount' / 'nbd.sock'}",
            ),
        }
        seconds: dict[str, dict[str, float]] = {}
        for side, (argv, uri) in sides.items():
            proc = served(argv, env, work / side / "nbd.sock")
            try:
                bench(uri, size, 1 << 20, size >> 20, 1 << 20, 4)  # warm: untimed
                seconds[side] = {
                    name: bench(uri, size, request, count, step, depth)
                    for name, request, count, step, depth in PATTERNS
                }
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
    print(f"image {size // MiB} MiB; seconds per pattern (qemu-img bench over NBD)")
    print(f"{'pattern':32} {'serve (file)':>13} {'mount (repo)':>13} {'mount/serve':>12}")
    for name, *_ in PATTERNS:
        s, m = seconds["serve"][name], seconds["mount"][name]
        print(f"{name:32} {s:>12.3f}s {m:>12.3f}s {m / s:>11.2f}x")


if __name__ == "__main__":
    main()
