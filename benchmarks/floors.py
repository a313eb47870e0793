"""What this machine allows: the least time a first backup's required work takes.

Why: issue 14 sets the repository's speeds as ratios to restic and borg measured on the
same machine. A ratio may ask for less time than the work the format itself requires can
take here, whatever the code around it does. This measures that work on the benchmark's
own image (``_repo_image.make_image``, same seed): every data chunk read from the page
cache, addressed (keyed SHA-256), compressed (zstd at the repository's level), encrypted
(AES-256-GCM) and its stored bytes hashed for the pack's name (BLAKE3), each step timed
alone on one core. The floor is their sum divided by the cores: as if nothing else ran
(no engine, no processes, no pack writes) and every core were busy all along. Faster zstd
levels are shown with what they would store.

A floor under a goal's budget does not make the goal reachable; a floor over it says it
is not, here. Run alone (other work only raises the floors)::

    ./dev bench floors [--size 2G] [--restic-first S] [--borg-first S]

``repo_vs_restic`` prints these floors at its end, with the times it measured.

Not measured: a floor for the restore. The disk's time to read the packs and write the
image at once varied from 1.8 to 2.6 s between identical runs here (the VM's memory
hand-back moves buffered writes), more than a whole restore takes on a good run, so it
bounds nothing.
"""

from __future__ import annotations

import argparse
import hmac
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from _repo_image import BLOCK, make_image, parse_size
from blockbackup.repository.blob import ZSTD_LEVEL

MiB = 1 << 20
CHUNK = 64 * 1024
LEVELS = (ZSTD_LEVEL, -1, -3, -5)


@dataclass
class BackupFloor:
    data: int  # bytes of non-zero chunks
    read: float  # seconds of one core for each step
    address: float
    compress: dict[int, tuple[float, int]]  # level -> (seconds, stored payload bytes)
    encrypt: float
    name: float

    def cpu(self, level: int = ZSTD_LEVEL) -> float:
        return self.read + self.address + self.compress[level][0] + self.encrypt + self.name

    def wall(self, level: int = ZSTD_LEVEL) -> float:
        return self.cpu(level) / (os.cpu_count() or 1)


def backup_floor(image: Path) -> BackupFloor:
    """Each step of a first backup over the image's data chunks, timed alone on one core."""
    key = os.urandom(32)
    aead = AESGCM(key)
    nonce = os.urandom(12)
    zero = bytes(CHUNK)
    compressors = {level: zstandard.ZstdCompressor(level=level) for level in LEVELS}
    read = address = encrypt = name = 0.0
    compress = {level: (0.0, 0) for level in LEVELS}
    data = 0
    buffer = bytearray(CHUNK)
    with open(image, "rb", buffering=0) as f:
        fd = f.fileno()
        offset = 0
        while True:
            start = time.perf_counter()
            n = os.preadv(fd, [buffer], offset)
            spent = time.perf_counter() - start
            if n <= 0:
                break
            offset += n
            chunk = bytes(buffer[:n])
            if chunk == zero[:n]:
                continue  # a hole (skipped unread) or a zero run: nothing stored
            read += spent
            data += n
            start = time.perf_counter()
            digest = hmac.digest(key, chunk, "sha256")
            address += time.perf_counter() - start
            payload = chunk
            for level, compressor in compressors.items():
                start = time.perf_counter()
                packed = compressor.compress(chunk)
                spent = time.perf_counter() - start
                stored = packed if len(packed) < n else chunk
                seconds, total = compress[level]
                compress[level] = (seconds + spent, total + len(stored))
                if level == ZSTD_LEVEL:
                    payload = stored
            start = time.perf_counter()
            sealed = aead.encrypt(nonce, payload, digest)
            encrypt += time.perf_counter() - start
            start = time.perf_counter()
            blake3.blake3(sealed).digest()
            name += time.perf_counter() - start
    return BackupFloor(data, read, address, compress, encrypt, name)


def report(
    image: Path,
    restic_first: float | None = None,
    borg_first: float | None = None,
) -> None:
    """Measure the floor over ``image`` and print it with the goals' budgets where the
    reference times are given."""
    with open(image, "rb") as f:  # in the page cache, as the benchmark's backups read it
        while f.read(8 * MiB):
            pass
    floor = backup_floor(image)
    cores = os.cpu_count() or 1

    def line(what: str, seconds: float, note: str = "") -> None:
        print(f"    {what:52} {seconds:6.2f} s  {note}")

    print(f"\nfloors on this machine ({cores} cores), {floor.data / MiB:.0f} MiB of data chunks")
    print("  first backup, each step alone on one core:")
    line("read from the page cache", floor.read)
    line("keyed SHA-256 addresses", floor.address)
    seconds, stored = floor.compress[ZSTD_LEVEL]
    line(f"zstd level {ZSTD_LEVEL} (ours)", seconds, f"stores {stored / MiB:.0f} MiB")
    for level in LEVELS[1:]:
        spent, kept = floor.compress[level]
        line(f"zstd level {level} (for comparison)", spent, f"would store {kept / MiB:.0f} MiB")
    line("AES-256-GCM", floor.encrypt)
    line("BLAKE3 pack names", floor.name)
    line(f"sum, on {cores} cores: at least", floor.wall())
    fastest = LEVELS[-1]
    goals = [
        ("first backup >= 4x restic", restic_first, 4.0),
        ("first backup >= 5x borg", borg_first, 5.0),
    ]
    shown = [(name, theirs / goal) for name, theirs, goal in goals if theirs]
    if shown:
        print(f"  {'goal':28} {'budget':>8} {'floor':>8}  (at zstd {fastest})")
    for name, budget in shown:
        least = floor.wall()
        verdict = (
            "out of reach here" if least > budget else f"{budget - least:.2f} s left for the rest"
        )
        print(f"  {name:28} {budget:7.2f}s {least:7.2f}s  ({floor.wall(fastest):.2f} s)  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="image size (default 2G, the issue's)")
    parser.add_argument("--seed", type=int, default=14, help="repo_vs_restic's image seed")
    parser.add_argument("--restic-first", type=float, help="restic's first backup, seconds")
    parser.add_argument("--borg-first", type=float, help="borg's first backup, seconds")
    args = parser.parse_args()
    size = parse_size(args.size) // BLOCK * BLOCK
    work = Path(tempfile.mkdtemp(prefix="bb-floors-", dir="/var/tmp"))
    try:
        image = work / "disk.img"
        make_image(image, size, random.Random(args.seed))
        report(image, args.restic_first, args.borg_first)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
