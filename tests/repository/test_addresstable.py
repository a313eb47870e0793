"""The known-address table answers as the dict it replaced: the same locations for every
address, first-learnt copies kept, unknown addresses absent, across growth and colliding
hashes."""

from __future__ import annotations

import os
import random

import pytest

from blockbackup.repository.addresstable import RECORD, AddressTable, Location


def _records(entries: list[tuple[bytes, int, int, int]]) -> bytes:
    return b"".join(RECORD.pack(*entry) for entry in entries)


def _check(table: AddressTable, model: dict[bytes, Location], absent: list[bytes]) -> None:
    assert len(table) == len(model)
    for address, location in model.items():
        assert address in table
        assert table.get(address) == location
    for address in absent:
        assert address not in table
        assert table.get(address) is None
        assert table.record(address) == -1
    for address, location in model.items():  # by record number: what a verify marks
        record = table.record(address)
        assert table.entry(record) == (address, location)
        assert table.pack_of(record) == location.pack


@pytest.mark.parametrize("seed", range(4))
def test_the_table_answers_as_a_dict(seed: int) -> None:
    rng = random.Random(seed)
    table, model = AddressTable(), {}
    # Some addresses share their first 8 bytes (the hash): they probe past each other.
    prefixes = [rng.randbytes(8) for _ in range(50)]
    known: list[bytes] = []

    def new_address() -> bytes:
        head = rng.choice(prefixes) if rng.random() < 0.2 else rng.randbytes(8)
        return head + rng.randbytes(24)

    for p in range(60):
        pack = f"{p:064x}"
        entries = []
        for i in range(rng.randrange(0, 200)):
            address = rng.choice(known) if known and rng.random() < 0.1 else new_address()
            entries.append((address, 8 + 100 * i, rng.randrange(1, 1 << 17), 1 << 16))
        table.learn(pack, _records(entries))
        for address, offset, length, plain in entries:
            model.setdefault(address, Location(pack, offset, length, plain))
            known.append(address)
        learnt = [table.entry(r) for r in table.records_of(pack)]  # its records, in order
        assert learnt == [(a, Location(pack, o, n, p)) for a, o, n, p in entries]
        for _ in range(rng.randrange(0, 20)):  # a writer's own packs, of a blob or none
            pack = f"{rng.randrange(1 << 30):064x}"
            entries = [(new_address(), rng.randrange(1 << 40), 9, 7)] if rng.random() < 0.9 else []
            table.learn(pack, _records(entries))
            for address, offset, length, plain in entries:
                model.setdefault(address, Location(pack, offset, length, plain))
                known.append(address)
    assert len(model) > 5000  # the slots grew several times
    _check(table, model, [new_address() for _ in range(500)])


def test_an_empty_table_and_bad_records() -> None:
    table = AddressTable()
    _check(table, {}, [bytes(32), os.urandom(32)])
    table.learn("p", b"")
    assert len(table) == 0
    with pytest.raises(ValueError, match="whole records"):
        table.learn("p", bytes(RECORD.size + 1))
