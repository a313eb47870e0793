"""The known-address table with its file (``knowntable.py``, ``tablefile.py``): every
address is found in a pack that still exists, across merges into the file, openings by
later processes, packs gc removed (and gave back), damaged files and unwritable caches."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from blockbackup.repository import tablefile
from blockbackup.repository.addresstable import RECORD, Location
from blockbackup.repository.knowntable import KnownTable
from blockbackup.repository.tablefile import DamagedTable, TableFile


class Model:
    """What the repository holds: each pack's entries, and which packs exist."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # Some addresses share their first 8 bytes (the fence's key): they sort by the rest.
        self.prefixes = [self.rng.randbytes(8) for _ in range(30)]
        self.packs: dict[str, list[tuple[bytes, int, int, int]]] = {}
        self.live: set[str] = set()
        self.known: list[bytes] = []

    def address(self) -> bytes:
        rng = self.rng
        if self.known and rng.random() < 0.15:  # stored again, in another pack
            return rng.choice(self.known)
        head = rng.choice(self.prefixes) if rng.random() < 0.2 else rng.randbytes(8)
        return head + rng.randbytes(24)

    def new_pack(self) -> tuple[str, bytes]:
        pack = self.rng.randbytes(32).hex()
        entries = []
        for i in range(self.rng.randrange(0, 40)):
            address = self.address()
            entries.append((address, 8 + 100 * i, self.rng.randrange(1, 1 << 17), 1 << 16))
            self.known.append(address)
        self.packs[pack] = entries
        self.live.add(pack)
        return pack, b"".join(RECORD.pack(*entry) for entry in entries)

    def locations(self, address: bytes) -> set[Location]:
        """Every place a live pack holds ``address``."""
        return {
            Location(pack, offset, length, plain)
            for pack in self.live
            for found, offset, length, plain in self.packs[pack]
            if found == address
        }

    def filled(self, path: Path, limit: int, packs: int) -> KnownTable:
        """A table at ``path`` that learnt ``packs`` new packs, as a backup writes them."""
        table = KnownTable(path, limit)
        for _ in range(packs):
            table.learn(*self.new_pack())
        return table

    def open(self, path: Path, limit: int) -> KnownTable:
        """A table as a new process's ``ChunkStore.load`` makes it: the file's live packs
        adopted, every other listed pack's index learnt."""
        table = KnownTable(path, limit)
        held = table.adopt(sorted(self.live))
        for pack in sorted(self.live - held):
            table.learn(pack, b"".join(RECORD.pack(*e) for e in self.packs[pack]))
        return table


def check(table: KnownTable, model: Model, absent: list[bytes]) -> None:
    for address in set(model.known):
        where = model.locations(address)
        location = table.get(address)
        if not where:
            assert location is None
            assert address not in table
            continue
        assert location in where
        assert table.pack_for(address) in {w.pack for w in where}
        record = table.record(address)  # by record number, as a verify marks
        found, at = table.entry(record)
        assert found == address
        assert at in where
        assert table.pack_of(record) == at.pack
    for address in absent:
        assert address not in table
        assert table.get(address) is None
        assert table.record(address) == -1


@pytest.mark.parametrize("limit", [1, 7, 60, 1 << 30])
@pytest.mark.parametrize("seed", range(3))
def test_every_address_is_found_in_a_live_pack(tmp_path: Path, seed: int, limit: int) -> None:
    model = Model(seed)
    path = tmp_path / "table"
    absent = [model.rng.randbytes(32) for _ in range(50)] + [p + bytes(24) for p in model.prefixes]
    table = KnownTable(path, limit)
    for round_ in range(6):
        for _ in range(model.rng.randrange(5, 15)):  # a backup writing packs
            table.learn(*model.new_pack())
        check(table, model, absent)
        for pack in model.rng.sample(sorted(model.live), len(model.live) // 5):
            model.live.discard(pack)  # gc removed it
        if round_ == 3:  # and gave one back (its index put back by a sweep)
            model.live.add(model.rng.choice(sorted(model.packs)))
        table.close()
        table = model.open(path, limit)  # the next process
        check(table, model, absent)
        assert table.file_error is None
    if limit < 1 << 30:
        assert path.exists()
        assert table.in_file > 0
    else:
        assert not path.exists()  # a table that fits in memory writes nothing


def test_records_of_removed_packs_are_dropped_once_a_quarter_are_gone(tmp_path: Path) -> None:
    model = Model(5)
    path = tmp_path / "table"
    table = model.filled(path, 1, 40)
    full = TableFile(path).count
    gone = sorted(model.live)[:20]
    model.live -= set(gone)
    table = model.open(path, 1)
    table.learn(*model.new_pack())  # a merge: half the packs are gone
    with TableFile(path) as file:
        kept = sum(len(entries) for pack, entries in model.packs.items() if pack in model.live)
        assert file.count == kept < full
        assert not set(file.packs) - set(model.live) - {""}  # the gone ones are unnamed
    model.live.add(gone[0])  # gc gives a gone pack its index back: it is read again
    table = model.open(path, 1)
    check(table, model, [])


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: b"BBTABLE9" + data[8:],
        lambda data: data + b"x",
        lambda data: b"",
    ],
    ids=["truncated", "another-version", "longer", "empty"],
)
def test_a_damaged_file_is_ignored(tmp_path: Path, damage: object) -> None:
    model = Model(2)
    path = tmp_path / "table"
    table = model.filled(path, 3, 20)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    table = KnownTable(path, 1 << 30)
    assert table.adopt(sorted(model.live)) == set()  # every index is read instead
    table = model.open(path, 1 << 30)
    check(table, model, [])


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_damage_in_the_fence_or_names_ignores_the_file(tmp_path: Path) -> None:
    """Checked at opening (a wrong fence would send lookups to the wrong group, which
    would then miss what is stored)."""
    model = Model(7)
    path = tmp_path / "table"
    table = model.filled(path, 3, 20)
    with TableFile(path) as file:
        fence_at = tablefile._HEADER.size + file.count * tablefile.SIZE
    _flip(path, fence_at + 2)
    assert KnownTable(path, 1 << 30).adopt(sorted(model.live)) == set()
    table = model.open(path, 1 << 30)
    check(table, model, [])


def _look_up_all(table: KnownTable, addresses: list[bytes]) -> None:
    for address in addresses:
        table.get(address)


def test_a_damaged_record_fails_its_lookup_and_removes_the_file(tmp_path: Path) -> None:
    """A flipped byte in a record would send this host's reads of a chunk to the wrong
    place until the cache is deleted: its group's check fails, the command that met it
    fails saying so, and the next opening reads the indexes instead."""
    model = Model(8)
    path = tmp_path / "table"
    model.filled(path, 3, 20)
    _flip(path, tablefile._HEADER.size + 5 * tablefile.SIZE + 40)  # record 5's offset
    damaged = model.open(path, 1 << 30)
    with pytest.raises(DamagedTable, match=r"is damaged .*the next run rebuilds it"):
        _look_up_all(damaged, model.known)
    assert not path.exists()
    check(model.open(path, 1 << 30), model, [])


def test_an_unwritable_cache_keeps_everything_in_memory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    model = Model(3)
    table = model.filled(tmp_path / "file" / "table", 2, 10)
    assert table.file_error is not None
    assert "File exists" in table.file_error
    assert table.in_file == 0
    check(table, model, [])


def test_a_reader_keeps_its_file_when_another_process_replaces_it(tmp_path: Path) -> None:
    model = Model(4)
    path = tmp_path / "table"
    first = model.filled(path, 1, 10)
    other = model.open(path, 1)
    other.learn(*model.new_pack())  # replaces the file the first one reads
    assert first.in_file < other.in_file
    check(other, model, [])
    for address in model.known[:-40]:  # what the first learnt: still found through its file
        assert address in first
    assert not list(tmp_path.glob(".tmp-*"))


def test_lookups_during_merges_see_one_version(tmp_path: Path) -> None:
    """A writer learns (and merges) while another thread looks up what was learnt before,
    as a backup's copy workers do without the store's lock."""
    model = Model(6)
    table = model.filled(tmp_path / "table", 5, 10)
    before = [a for a in model.known if model.locations(a)]
    errors: list[str] = []
    done = threading.Event()

    def look() -> None:
        while not done.is_set():
            errors.extend(a.hex() for a in before if table.pack_for(a) is None)

    reader = threading.Thread(target=look)
    reader.start()
    try:
        for _ in range(60):
            table.learn(*model.new_pack())
    finally:
        done.set()
        reader.join()
    assert not errors


def test_fence_lookups_across_groups_of_one_address(tmp_path: Path) -> None:
    """One address in more packs than a group holds, most of them gone: the live copy past
    the group boundary is found, and the addresses around it too."""
    address = bytes(8) + os.urandom(24)
    before, after = bytes(8) + bytes(24), bytes(8) + b"\xff" * 24
    runs = [(RECORD.pack(address, n, 1, 1), f"{n:064x}") for n in range(3 * tablefile.GROUP)]
    runs = [(RECORD.pack(before, 0, 1, 1), "b" * 64), *runs]
    runs.append((RECORD.pack(after, 0, 1, 1), "a" * 64))
    with tablefile.write(tmp_path / "t", None, None, runs) as file:
        live = bytearray(len(file.packs))
        live[file.packs.index(f"{2 * tablefile.GROUP + 5:064x}")] = 1
        found = file.find(address, live)
        assert found is not None
        assert found[1][1] == 2 * tablefile.GROUP + 5
        for other in (before, after):
            assert file.find(other, live) is None  # their packs are not live
            live[file.packs.index(("b" if other == before else "a") * 64)] = 1
            assert file.find(other, live) is not None
        assert file.first(bytes(32)) == 0
        assert file.first(b"\xff" * 32) == file.count


def test_a_killed_merges_temporary_file_is_removed_by_a_later_merge(tmp_path: Path) -> None:
    """Each is as large as the table (GBs for a big repository)."""
    old, fresh = tmp_path / ".tmp-0123456789ab", tmp_path / ".tmp-ba9876543210"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")  # a merge of another process, going on now
    os.utime(old, (1, 1))
    model = Model(9)
    model.filled(tmp_path / "table", 2, 5)
    assert not old.exists()
    assert fresh.exists()
