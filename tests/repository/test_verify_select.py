"""verify --sample and --skip-verified-within: each reads only the packs it should (counted
at the backend) and still finds damage in what it reads; a damaged manifest is named while
the other snapshots are checked."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blockbackup.repository import catalog, directio
from blockbackup.repository.backend import DirectoryBackend
from blockbackup.repository.chunkstore import pack_key
from blockbackup.repository.repo import CHUNK_SIZE, Repository
from blockbackup.repository.verify import verify
from blockbackup.repository.verify_select import PREFIX, Selection, record, record_key
from testkit.repo import store_disk

PASS = b"correct horse battery staple"
CHUNK = CHUNK_SIZE


class CountingBackend(DirectoryBackend):
    """A directory backend that counts whole-object reads of data packs (what verify
    reads to check a pack; index segments are read as ranges)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.whole_pack_reads: Counter[str] = Counter()

    def get_buffer(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        into: directio.ReadBuffer | None = None,
    ) -> bytes | memoryview:
        if key.startswith("data/") and offset == 0 and length is None:
            self.whole_pack_reads[key.rsplit("/", 1)[1]] += 1
        return super().get_buffer(key, offset, length, into)


def opened(path: Path) -> tuple[Repository, CountingBackend]:
    repo = Repository.open(str(path), PASS)
    counting = CountingBackend(path)
    repo.backend = counting  # before the store is loaded: it reads through this backend
    return repo, counting


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, list[str]]:
    """A repository with one snapshot over 12 data packs (4 chunks each); the data packs."""
    repo = Repository.init(str(tmp_path / "r"), PASS, pack_size=4 * CHUNK)
    data = os.urandom(48 * CHUNK)
    record = store_disk(repo, "d", data)
    repo.commit([record])
    packs = sorted({repo.store.locate(repo.keys.address(data[i : i + CHUNK])).pack
                    for i in range(0, len(data), CHUNK)})  # fmt: skip
    assert len(packs) >= 12
    return tmp_path / "r", packs


def damage(path: Path, pack: str) -> None:
    file = path / pack_key(pack)
    raw = bytearray(file.read_bytes())
    raw[20] ^= 1
    file.write_bytes(bytes(raw))


def test_sample_reads_a_seeded_share_and_finds_damage_in_it(made: tuple[Path, list[str]]) -> None:
    path, packs = made
    repo, counting = opened(path)
    report = verify(repo, repo.snapshots(), selection=Selection(sample=25, seed=7))
    assert report.ok
    read = set(counting.whole_pack_reads)
    assert read <= set(packs)
    assert len(read) == report.packs == -(-len(packs) * 25 // 100)
    assert report.skipped_sample == len(packs) - len(read)
    assert max(counting.whole_pack_reads.values()) == 1
    # the same seed draws the same packs
    again, counting2 = opened(path)
    verify(again, again.snapshots(), selection=Selection(sample=25, seed=7))
    assert set(counting2.whole_pack_reads) == read
    # damage in a sampled pack is found; damage in a pack outside the sample is not read
    inside, outside = sorted(read)[0], sorted(set(packs) - read)[0]
    damage(path, inside)
    damage(path, outside)
    third, _ = opened(path)
    report = verify(third, third.snapshots(), selection=Selection(sample=25, seed=7))
    assert set(report.damaged_packs) == {inside}
    full, _ = opened(path)
    assert set(verify(full, full.snapshots()).damaged_packs) == {inside, outside}


def test_skip_verified_within_reads_nothing_verified_recently(
    made: tuple[Path, list[str]],
) -> None:
    path, packs = made
    repo, counting = opened(path)
    first = verify(repo, repo.snapshots())
    assert first.ok
    read_first = set(counting.whole_pack_reads)
    assert set(packs) <= read_first
    recorded = {k.removeprefix(PREFIX) for k in DirectoryBackend(path).list(PREFIX)}
    assert recorded == read_first  # every pack that passed, nothing else

    skip = Selection(skip_within=timedelta(days=1))
    second, counting2 = opened(path)
    report = verify(second, second.snapshots(), selection=skip)
    assert report.ok
    assert not counting2.whole_pack_reads  # nothing read: all verified within a day
    assert report.skipped_recent == len(read_first)
    assert report.packs == 0

    # a record from long ago does not count; a forged (undecodable) one neither
    old, forged = packs[0], packs[1]
    record(second, old, datetime(2020, 1, 1, tzinfo=UTC))
    forgery = {"version": 1, "pack": forged, "time": "2099-01-01T00:00:00Z"}
    (path / record_key(forged)).write_text(json.dumps(forgery))
    third, counting3 = opened(path)
    verify(third, third.snapshots(), selection=skip)
    assert set(counting3.whole_pack_reads) == {old, forged}

    # a pack damaged after it passed: the full verify finds it and drops its record, so the
    # next skipping verify reads it again (and finds it again)
    damage(path, packs[2])
    fourth, _ = opened(path)
    assert set(verify(fourth, fourth.snapshots(), selection=skip).damaged_packs) == set()
    full, _ = opened(path)
    assert set(verify(full, full.snapshots()).damaged_packs) == {packs[2]}
    assert not (path / record_key(packs[2])).exists()
    fifth, counting5 = opened(path)
    report = verify(fifth, fifth.snapshots(), selection=skip)
    assert set(counting5.whole_pack_reads) == {packs[2]}
    assert set(report.damaged_packs) == {packs[2]}


def test_a_damaged_manifest_is_named_and_the_others_are_checked(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), PASS)
    good = repo.commit([store_disk(repo, "a", os.urandom(2 * CHUNK))])
    bad = repo.commit([store_disk(repo, "b", os.urandom(2 * CHUNK))])
    file = tmp_path / "r" / catalog.PREFIX / bad.id
    file.write_bytes(file.read_bytes()[:-5])  # truncated
    manifests, damaged = catalog.read_many(repo.backend, repo.keys, repo.snapshot_ids())
    assert [m.id for m in manifests] == [good.id]
    assert list(damaged) == [bad.id]
    report = verify(repo, manifests, unreadable=damaged)
    assert not report.ok
    assert report.damaged_snapshots == damaged
    assert report.chunks == 2


def test_packs_left_out_must_still_exist(made: tuple[Path, list[str]]) -> None:
    """Skipping or sampling saves reading, never the check that a pack is there whole."""
    path, packs = made
    repo, _ = opened(path)
    assert verify(repo, repo.snapshots()).ok  # records every pack
    gone, cut = packs[3], packs[4]
    (path / pack_key(gone)).unlink()
    file = path / pack_key(cut)
    file.write_bytes(file.read_bytes()[:100])
    for selection in (Selection(skip_within=timedelta(days=1)), Selection(sample=1, seed=1)):
        again, counting = opened(path)
        report = verify(again, again.snapshots(), selection=selection)
        assert report.damaged_packs[gone] == "missing"
        assert report.damaged_packs[cut] in ("truncated", "content does not match its name")
        assert {d.snapshot for d in report.damage} == {again.snapshot_ids()[0]}
        assert len(counting.whole_pack_reads) <= 1
