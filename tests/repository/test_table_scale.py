"""The known-address table in bounded memory: every backup, restore and verify loads it, so
its size per chunk is what a big repository costs each of them (the peers' users' first
complaint: restic holds about 6x its index in RAM).

A repository of 1,000,000 chunks (64 GiB of unique data at 64 KiB) is opened and its table
loaded in a subprocess; as a Python dict it took ~210 bytes per chunk (a bytes key, a
``Location``, the slot): 237 MiB peak here. It must stay under 120 MiB, and every
chunk must be found where its pack header says. Past 512Ki records the table moves into
its file in the local cache (``knowntable.py``): a second opening reads only the indexes
the file lacks, and holds less.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from repository.test_gc_scale import CHUNKS, build

PROBE = """
import random, sys, time
from blockbackup.repository.repo import Repository
from blockbackup.repository.chunkstore import decode_pack_header, index_key
start = time.perf_counter()
repo = Repository.open(sys.argv[1])
store = repo.store
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: that counts the forking test process's pages before the exec.
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
packs = sorted(k.rsplit("/", 1)[1] for k in repo.backend.list("index/"))
for pack in random.Random(7).sample(packs, 5):
    for address, offset, length, plain in decode_pack_header(
        repo.keys, repo.backend.get(index_key(pack)), pack
    ):
        location = store.locate(address)
        assert (location.pack, location.offset, location.length, location.plain) == (
            pack, offset, length, plain
        ), address.hex()
assert not store.has(bytes(range(32)))
print(len(store), peak, seconds, store.table.in_file)
"""


def test_a_million_chunks_load_in_bounded_memory(tmp_path: Path) -> None:
    location = tmp_path / "repo"
    build(location)
    env = {**os.environ, "BB_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("BB_TABLE_MEMORY_RECORDS", None)
    peaks = []
    for opening in ("first", "second"):
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, str(location)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        count, peak, seconds, in_file = proc.stdout.split()
        print(
            f"{opening} opening, table of {count} blobs ({in_file} in its file): "
            f"peak RSS {int(peak) / 2**20:.1f} MiB, {float(seconds):.2f} s"
        )
        assert int(count) > CHUNKS  # and the disk index segments
        assert int(in_file) >= 1 << 19
        assert int(peak) < 120 << 20
        peaks.append(int(peak))
    assert peaks[1] < peaks[0]
