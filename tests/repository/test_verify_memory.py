"""verify holds about a bit per chunk, not an entry: it marks the table's record of every
address the snapshots use and makes a pack's list of blobs only when it checks the pack.
As a dict of address -> location for every chunk used it took ~240 bytes a chunk on top
of the table (240 MiB for 1M chunks)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

from blockbackup.repository.catalog import DiskRecord
from blockbackup.repository.diskindex import DiskIndex
from blockbackup.repository.repo import Repository
from blockbackup.repository.verify import verify

CHUNKS = 30_000
CHUNK = 64 * 1024


def test_verify_marks_a_bit_per_chunk(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), None, pack_size=16 * 1024)  # ~150 a pack
    index = DiskIndex(repo.store, CHUNKS * CHUNK, CHUNK)
    for i in range(CHUNKS):  # tiny chunks: the count matters, not their size
        data = os.urandom(64)
        address = repo.keys.address(data)
        repo.store.add(address, data)
        index.set(i, address)
    index.set(CHUNKS - 1, index.get(0))  # a chunk used twice is checked once
    record = DiskRecord("d", CHUNKS * CHUNK, CHUNK, index.save())
    repo.store.flush()
    repo.commit([record])
    opened = Repository.open(str(tmp_path / "r"))
    assert len(opened.store) > CHUNKS  # the table is loaded before the measure
    tracemalloc.start()
    try:
        report = verify(opened, opened.snapshots())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok
    assert report.chunks == CHUNKS - 1
    # Measured: 8.9 MB as a dict (296 bytes a chunk); 1.9 MB now, mostly the disk index's
    # segments (512 KiB each).
    assert peak < CHUNKS * 100, peak
