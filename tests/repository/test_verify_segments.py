"""verify walks a disk index segment once, however many snapshots share it (an unchanged
GiB keeps its segment), and still names every snapshot a damaged segment hurts."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.diskindex import SEGMENT_ENTRIES, DiskIndex
from blockbackup.repository.repo import CHUNK_SIZE, Repository
from blockbackup.repository.verify import verify
from repository.test_chunk_reads import flip_stored_byte

PASS = b"segments"
SIZE = 2 * SEGMENT_ENTRIES * CHUNK_SIZE  # two segments


def snapshot(repo: Repository, base: DiskRecord | None, changes: list[int]) -> Manifest:
    """A disk of two segments with a few tiny chunks; ``changes``: the chunks written."""
    index = DiskIndex(repo.store, SIZE, CHUNK_SIZE, base.segments if base else None)
    for i in changes:
        data = os.urandom(64)
        address = repo.keys.address(data)
        repo.store.add(address, data)
        index.set(i, address)
    record = DiskRecord("d", SIZE, CHUNK_SIZE, index.save())
    repo.store.flush()
    return repo.commit([record])


def test_a_shared_segment_is_walked_once_and_its_damage_named_for_each_snapshot(
    tmp_path: Path,
) -> None:
    repo = Repository.init(str(tmp_path / "r"), PASS)
    first = snapshot(repo, None, [0, 1, SEGMENT_ENTRIES, SEGMENT_ENTRIES + 5])
    manifests = [first]
    for n in range(4):  # later snapshots change the second segment only
        manifests.append(snapshot(repo, manifests[-1].disks[0], [SEGMENT_ENTRIES + 10 + n]))
    shared = first.disks[0].segments[0]
    assert all(m.disks[0].segments[0] == shared for m in manifests)

    opened = Repository.open(str(tmp_path / "r"), PASS)
    reads: Counter[bytes] = Counter()
    read = opened.store.read

    def counting(address: bytes) -> bytes:
        reads[address] += 1
        return read(address)

    opened.store.read = counting  # type: ignore[method-assign]
    report = verify(opened, opened.snapshots())
    assert report.ok
    assert report.chunks == 4 + 4  # each chunk once
    assert reads[shared] == 1  # was once per snapshot, twice for a disk of many segments

    flip_stored_byte(tmp_path, opened.store, shared, 40)
    damaged = verify(Repository.open(str(tmp_path / "r"), PASS), opened.snapshots())
    hurt = sorted(d.snapshot for d in damaged.damage if d.offset is None)
    assert hurt == sorted(m.id for m in manifests)  # every snapshot that uses it
