"""The known-address table: where each stored blob is, in about 60 bytes per blob.

Why not a dict: every backup, restore and verify loads the table, and as a dict of bytes
keys and location objects it took ~210 bytes per blob: a repository of 1M chunks (64 GiB
of unique data at 64 KiB) cost 210 MiB in each of them, one of 64M chunks (4 TiB) 13 GiB.
Here a blob is one 48-byte record in a pack header's own layout (address, offset, stored
length, plaintext length), so a pack's header is learnt with one append; the number of its
pack (4 bytes); and a slot of an open-addressing hash table (4 bytes, at most half of them
used). Addresses are keyed SHA-256 digests, spread uniformly, so their first 8 bytes are
the hash; a lookup compares whole addresses.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

#: A record: the layout of a pack header's entries (``chunkstore``'s header format).
RECORD = struct.Struct("<32sQII")
_SIZE = RECORD.size
#: A slot's hash: an address's first 8 bytes.
_HASH = struct.Struct("<Q")
#: An address's first 8 bytes in the order of the addresses (for sorting).
_PREFIX = struct.Struct(">Q")
_MIN_SLOTS = 1 << 10


@dataclass(frozen=True, slots=True)
class Location:
    """Where a blob is: its pack, and its stored bytes' range and plaintext length."""

    pack: str
    offset: int
    length: int
    plain: int


class AddressTable:
    """Address -> :class:`Location`, for many blobs in little memory.

    One writer at a time (the store's lock); a lookup alongside it finds an address
    learnt before, or may miss one being learnt (as with a dict).
    """

    def __init__(self) -> None:
        self._records = bytearray()
        self._pack_of: array[int] = array("I")  # each record's pack, as an index of _packs
        self._packs: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        self._slots: array[int] = array("I", bytes(4 * _MIN_SLOTS))  # record + 1; 0: free
        self._count = 0  # records in the slots (a duplicate record is in none)
        #: Each pack's records, as (first, end) runs: a pack is learnt in one append.
        self._runs: dict[int, list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return self._count

    def __contains__(self, address: bytes) -> bool:
        return self._find(address) >= 0

    def get(self, address: bytes) -> Location | None:
        record = self._find(address)
        return None if record < 0 else self.entry(record)[1]

    # Records by number, for a caller that marks many blobs in a bit each (a verify).

    @property
    def records(self) -> int:
        """How many records there are (numbered from 0; some may be duplicates that no
        address finds)."""
        return len(self._records) // _SIZE

    def record(self, address: bytes) -> int:
        """The record ``address`` finds, -1 if it is not known."""
        return self._find(address)

    def pack_of(self, record: int) -> str:
        return self._packs[self._pack_of[record]]

    def entry(self, record: int) -> tuple[bytes, Location]:
        address, offset, length, plain = RECORD.unpack_from(self._records, record * _SIZE)
        return address, Location(self.pack_of(record), offset, length, plain)

    def records_of(self, pack: str) -> Iterator[int]:
        """The records learnt from ``pack``."""
        number = self._pack_numbers.get(pack)
        for first, end in self._runs.get(number, []) if number is not None else []:
            yield from range(first, end)

    def holds(self, pack: str) -> bool:
        """Whether records of ``pack`` were learnt here."""
        return pack in self._pack_numbers

    @property
    def packs(self) -> list[str]:
        """The packs learnt here, in the order first learnt."""
        return list(self._packs)

    def sorted_records(self) -> Iterator[tuple[bytes, str]]:
        """Every record (duplicates too) with its pack's name, sorted by address: for
        writing them into a table file (``tablefile.py``).

        Sorted as one int per record (the address's first 8 bytes, then the record's
        number: ~50 bytes each, where sorting by the addresses themselves took ~110), then
        the rare runs of equal first bytes by their whole addresses."""
        records = self._records
        prefix = _PREFIX.unpack_from
        keys = sorted(prefix(records, r * _SIZE)[0] << 32 | r for r in range(self.records))
        order = array("I", (key & 0xFFFFFFFF for key in keys))
        prefixes = array("Q", (key >> 32 for key in keys))
        del keys
        # Neighbours of equal first bytes: copies of an address, or (rarely) a collision.
        neighbours = zip(prefixes, islice(prefixes, 1, None), strict=False)
        for shared in {p for p, q in neighbours if p == q}:
            start, end = bisect_left(prefixes, shared), bisect_right(prefixes, shared)
            order[start:end] = array(
                "I", sorted(order[start:end], key=lambda r: records[r * _SIZE : r * _SIZE + 32])
            )
        del prefixes
        packs, pack_of = self._packs, self._pack_of
        for record in order:
            yield bytes(records[record * _SIZE : (record + 1) * _SIZE]), packs[pack_of[record]]

    def learn(self, pack: str, records: bytes | bytearray | memoryview) -> None:
        """Add a pack header's entries (whole records); an address already known keeps
        its first location, as the copy found first serves as well as any."""
        count, rest = divmod(len(records), _SIZE)
        if rest:
            raise ValueError("a pack header's entries are whole records")
        self._reserve(self._count + count)
        first = len(self._records) // _SIZE
        self._records += records
        number = self._number(pack)
        self._pack_of.extend(array("I", [number]) * count)
        self._runs.setdefault(number, []).append((first, first + count))
        slots, table = self._slots, self._records
        mask = len(slots) - 1
        for record in range(first, first + count):
            start = record * _SIZE
            slot = _HASH.unpack_from(table, start)[0] & mask
            while held := slots[slot]:
                other = (held - 1) * _SIZE
                if table[other : other + 32] == table[start : start + 32]:
                    break  # known already
                slot = (slot + 1) & mask
            else:
                slots[slot] = record + 1
                self._count += 1

    def _number(self, pack: str) -> int:
        number = self._pack_numbers.get(pack)
        if number is None:
            number = self._pack_numbers[pack] = len(self._packs)
            self._packs.append(pack)
        return number

    def _find(self, address: bytes) -> int:
        """The record of ``address``, -1 if it is not known (linear probing)."""
        slots, records = self._slots, self._records
        mask = len(slots) - 1
        slot: int = _HASH.unpack_from(address)[0] & mask
        while held := slots[slot]:
            if records.startswith(address, (held - 1) * _SIZE):
                return held - 1
            slot = (slot + 1) & mask
        return -1

    def _reserve(self, count: int) -> None:
        """Grow the slots so that ``count`` records fill at most half of them."""
        size = len(self._slots)
        if 2 * count <= size:
            return
        while 2 * count > size:
            size *= 2
        records = self._records
        slots: array[int] = array("I", bytes(4 * size))
        mask = size - 1
        for held in self._slots:
            if held:  # addresses differ: only a free slot is looked for
                slot = _HASH.unpack_from(records, (held - 1) * _SIZE)[0] & mask
                while slots[slot]:
                    slot = (slot + 1) & mask
                slots[slot] = held
        # Whole before it is seen: a lookup without the store's lock (a writer asking
        # whether to encode a chunk) finds what it found before.
        self._slots = slots
