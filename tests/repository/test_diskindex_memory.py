"""A disk index holds a bounded number of changed segments: a backup that changes every
GiB of a big disk (a first backup, or scattered writes) stores the oldest changed segments
early instead of holding all of them (32 bytes a chunk: 512 MiB for 1 TiB), and what it
saves at the end is the same index."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

from blockbackup.repository.diskindex import SEGMENT_ENTRIES, DiskIndex
from blockbackup.repository.keys import ZERO_ADDRESS
from blockbackup.repository.repo import Repository

CHUNK = 64 * 1024
SEGMENTS = 100  # 100 GiB of disk: 50 MiB of index if every changed segment stayed


def test_changed_segments_are_stored_early_and_saved_the_same(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), None)
    size = SEGMENTS * SEGMENT_ENTRIES * CHUNK
    index = DiskIndex(repo.store, size, CHUNK)
    rng = random.Random(3)
    expected: dict[int, bytes] = {}
    tracemalloc.start()
    try:
        for segment in range(SEGMENTS):  # every segment changed, in disk order
            for _ in range(3):
                chunk = segment * SEGMENT_ENTRIES + rng.randrange(SEGMENT_ENTRIES)
                expected[chunk] = os.urandom(32)
                index.set(chunk, expected[chunk])
        for chunk in (5, SEGMENT_ENTRIES + 7):  # segments stored early, changed again
            expected[chunk] = os.urandom(32)
            index.set(chunk, expected[chunk])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30 << 20, peak  # 40 segments of 512 KiB at most, not 100
    segments = index.save()
    repo.store.flush()
    assert ZERO_ADDRESS not in segments
    reopened = Repository.open(str(tmp_path / "r"))
    again = DiskIndex(reopened.store, size, CHUNK, segments)
    for chunk, address in expected.items():
        assert again.get(chunk) == address
    for chunk in rng.sample(range(SEGMENTS * SEGMENT_ENTRIES), 200):
        if chunk not in expected:
            assert again.get(chunk) == ZERO_ADDRESS
