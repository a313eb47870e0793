"""The known-address table of a chunk store: recent blobs in memory, the rest in a file.

Why two parts: the in-memory table (``addresstable.py``, ~60 bytes per blob) is the fastest
and is all a small repository needs; a large one would not fit in a process (4 TiB of
unique data is 64M blobs, ~3.8 GiB). Once the memory part holds ``limit`` records it is
merged into the sorted file of the local cache (``tablefile.py``), so a process holds at
most ``limit`` records whatever the repository's size, and the next opening reads only the
indexes of packs the file does not know yet.

Which of the file's packs exist is decided at each opening, from the repository's index
listing: a pack gc removed since is "not live", and its records are never found (they are
dropped from the file when a quarter of its packs are gone). A file that is missing,
damaged or of another version is ignored (and replaced at the next merge); a cache that
cannot be written leaves everything in memory, as for a small repository.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blockbackup.repository import tablefile
from blockbackup.repository.addresstable import AddressTable, Location
from blockbackup.repository.tablefile import TableFile


def default_limit() -> int:
    """Records held in memory before a merge into the file (``$BB_TABLE_MEMORY_RECORDS``;
    512Ki records, ~30 MiB, is 32 GiB of unique data at 64 KiB per chunk)."""
    try:
        return max(int(os.environ.get("BB_TABLE_MEMORY_RECORDS", "")), 1)
    except ValueError:
        return 1 << 19


@dataclass(frozen=True)
class _State:
    """The parts, replaced whole: a lookup without the store's lock sees one version."""

    file: TableFile | None = None
    #: Per pack number of ``file``: whether the pack exists (1) or not (0).
    live: bytearray = field(default_factory=bytearray)
    memory: AddressTable = field(default_factory=AddressTable)

    @property
    def base(self) -> int:
        """The number of the memory part's first record (the file's come first)."""
        return 0 if self.file is None else self.file.count


class KnownTable:
    """Address -> where the blob is, over the memory part and the file.

    One writer at a time (the store's lock); lookups alongside it as with
    :class:`AddressTable`. Record numbers (:meth:`record`) hold until the next merge: a
    reader that keeps them (a verify) learns nothing meanwhile.
    """

    def __init__(self, path: Path | None = None, limit: int | None = None) -> None:
        self._path = path
        self._limit = default_limit() if limit is None else limit
        self._state = _State()
        #: Why the file could not be written (then everything stays in memory).
        self.file_error: str | None = None

    # -- the file ---------------------------------------------------------------------------

    def adopt(self, listed: Iterable[str]) -> set[str]:
        """Open the cached file, taking as live its packs in ``listed`` (the repository's
        index listing); the listed packs it holds, whose indexes need no reading."""
        if self._path is None:
            return set()
        try:
            file = TableFile(self._path)
        except (OSError, ValueError):
            return set()
        wanted = set(listed)
        live = bytearray(pack in wanted for pack in file.packs)
        self._state = _State(file, live, self._state.memory)
        return {pack for pack, flag in zip(file.packs, live, strict=True) if flag}

    @property
    def in_file(self) -> int:
        """How many records the file holds (0 without one)."""
        return self._state.base

    def holds_in_file(self, pack: str) -> bool:
        """Whether the file holds ``pack`` and it is live."""
        state = self._state
        number = None if state.file is None else state.file.number_of(pack)
        return number is not None and bool(state.live[number])

    def _merge(self) -> None:
        """Move the memory part into a new file (the old one's records merged in)."""
        assert self._path is not None
        state = self._state
        dead = state.live.count(0)
        keep = state.live if state.file is not None and 4 * dead > len(state.live) else None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tablefile.remove_stale_temporaries(self._path.parent)
            file = tablefile.write(self._path, state.file, keep, state.memory.sorted_records())
        except OSError as exc:
            self.file_error = f"the address table's file {self._path}: {exc}"
            self._path = None  # everything stays in memory from now on
            return
        live = bytearray(len(file.packs))
        live[: len(state.live)] = state.live  # old packs keep their numbers
        numbers = {pack: n for n, pack in enumerate(file.packs)}
        for pack in state.memory.packs:
            if pack in numbers:  # a pack of no records is not in the file
                live[numbers[pack]] = 1
        self._state = _State(file, live, AddressTable())

    # -- learning ---------------------------------------------------------------------------

    def learn(self, pack: str, records: bytes | bytearray | memoryview) -> None:
        """As :meth:`AddressTable.learn`; past the memory part's limit, merge it into the
        file."""
        memory = self._state.memory
        memory.learn(pack, records)
        if self._path is not None and memory.records >= self._limit:
            self._merge()

    # -- lookups ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Records known (the file's count its duplicates and gone packs' too)."""
        state = self._state
        return state.base + len(state.memory)

    def __contains__(self, address: bytes) -> bool:
        return self.pack_for(address) is not None

    def pack_for(self, address: bytes) -> str | None:
        """The pack that holds ``address``, None if none is known."""
        state = self._state
        memory = state.memory
        record = memory.record(address)
        if record >= 0:
            return memory.pack_of(record)
        if state.file is None:
            return None
        found = state.file.find(address, state.live)
        return None if found is None else state.file.packs[found[1][4]]

    def get(self, address: bytes) -> Location | None:
        state = self._state
        location = state.memory.get(address)
        if location is not None or state.file is None:
            return location
        found = state.file.find(address, state.live)
        if found is None:
            return None
        _address, offset, length, plain, pack = found[1]
        return Location(state.file.packs[pack], offset, length, plain)

    # Records by number, for a caller that marks many blobs in a bit each (a verify).

    @property
    def records(self) -> int:
        state = self._state
        return state.base + state.memory.records

    def record(self, address: bytes) -> int:
        """The record ``address`` finds, -1 if it is not known."""
        state = self._state
        record = state.memory.record(address)
        if record >= 0:
            return state.base + record
        if state.file is None:
            return -1
        found = state.file.find(address, state.live)
        return -1 if found is None else found[0]

    def pack_of(self, record: int) -> str:
        state = self._state
        if record >= state.base:
            return state.memory.pack_of(record - state.base)
        assert state.file is not None
        return state.file.packs[state.file.pack_number(record)]

    def entry(self, record: int) -> tuple[bytes, Location]:
        state = self._state
        if record >= state.base:
            return state.memory.entry(record - state.base)
        assert state.file is not None
        return state.file.entry(record)

    def memory_records_of(self, pack: str) -> Iterator[int]:
        """The records of ``pack`` in the memory part (the file's are found by address)."""
        state = self._state
        for record in state.memory.records_of(pack):
            yield state.base + record

    def file_records_of(self, pack: str) -> Iterator[int]:
        """The file's records of ``pack``, by reading the whole file: for when its index
        cannot be read to look them up."""
        state = self._state
        number = None if state.file is None else state.file.number_of(pack)
        if state.file is not None and number is not None:
            yield from state.file.scan_pack(number)

    def close(self) -> None:
        """Close the file; the table is not used after it."""
        state = self._state
        if state.file is not None:
            state.file.close()


__all__ = ["KnownTable", "default_limit"]
