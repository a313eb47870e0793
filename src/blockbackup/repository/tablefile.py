"""The known-address table as a sorted local file: a lookup reads one group of records.

Why a file: in memory the table costs ~60 bytes per stored blob (``addresstable.py``), so a
repository of 4 TiB of unique data (64M chunks of 64 KiB) would need ~3.8 GiB in every
backup, restore and verify, and reading every pack index to build it at each opening. Here
the records lie sorted by address in a file of the local cache; the process keeps only a
fence (the first 8 bytes of every 64th address: 0.125 bytes per blob) and the pack names,
and the page cache, not the process, holds the rest.

The file is a cache of facts that never change (a pack is named by its content, and its
header says where each blob is), so any complete file is correct: which of its packs still
exist is the caller's to say (``live``). It is replaced whole (temp file + rename), never
changed in place: a process keeps reading the file it opened.

Layout (little-endian, all integers unsigned)::

    header   magic "BBTABLE1", count u64, groups u64, packs u32, names u32 (bytes), and
             the CRC-32 of fence, checks and names (checked at opening) u32
    records  count x (address 32s, offset u64, length u32, plain u32, pack u32), sorted
             by address (a blob stored in several packs has several records)
    fence    groups x u64, big-endian: the first 8 bytes of record 64 * i
    checks   groups x u32: the CRC-32 of each group of 64 records, checked at each read
             (a damaged file is removed, and the command that found it fails: a wrong
             record would send reads to the wrong place on this host until it is gone)
    names    the pack names, newline-separated, numbered from 0 (an empty name: a pack
             whose records were left out)
"""

from __future__ import annotations

import os
import secrets
import struct
import sys
import time
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from pathlib import Path

from blockbackup.repository.addresstable import RECORD, Location
from blockbackup.repository.errors import CorruptData

MAGIC = b"BBTABLE1"
_HEADER = struct.Struct("<8sQQIII")
#: A record: a pack header's entry, then the number of its pack in the file's names.
ENTRY = struct.Struct("<32sQIII")
SIZE = ENTRY.size
_PACK = struct.Struct("<I")
#: Records per fence entry: a lookup reads one group (3,328 bytes), rarely two.
GROUP = 64
#: Records per block when the file is read in bulk (whole groups, about 4 MiB).
_BLOCK = GROUP * ((4 << 20) // (GROUP * SIZE))

#: A record as read: address, offset, stored length, plain length, pack number.
Entry = tuple[bytes, int, int, int, int]


class TableFile:
    """A table file opened for lookups (thread-safe: ``pread`` only)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) != _HEADER.size:
                raise ValueError("too short")
            magic, count, groups, packs, names, meta = _HEADER.unpack(head)
            self.count: int = count
            if magic != MAGIC or groups != -(-count // GROUP):
                raise ValueError("not a table file of this version")
            self._records_at = _HEADER.size
            fence_at = self._records_at + self.count * SIZE
            checks_at = fence_at + 8 * groups
            names_at = checks_at + 4 * groups
            if os.fstat(fd).st_size != names_at + names:
                raise ValueError("its size does not match its header")
            tail = _read(fd, names_at + names - fence_at, fence_at)
            if zlib.crc32(tail) != meta:
                raise ValueError("its fence, checks or names are damaged")
            self._fence: array[int] = array("Q", tail[: 8 * groups])
            if sys.byteorder == "little":
                self._fence.byteswap()
            self._checks: array[int] = array("I", tail[8 * groups : 12 * groups])
            if sys.byteorder == "big":
                self._checks.byteswap()
            text = tail[12 * groups :].decode("ascii")
            self.packs: list[str] = text.split("\n") if packs else []
            if len(self.packs) != packs:
                raise ValueError("its pack names do not match its header")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.path = path
        self._numbers: dict[str, int] | None = None

    def close(self) -> None:
        """Close the file; only once no thread reads it (a closed descriptor's number may
        be given to another file). Left to the last reference otherwise."""
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    __del__ = close

    def first(self, address: bytes) -> int:
        """The number of the first record whose address is >= ``address`` (``count`` if
        none is)."""
        return self._first(address)[0]

    def _first(self, address: bytes) -> tuple[int, bytes, int]:
        """:meth:`first`, with the group read to find it and the record's place in it."""
        prefix = int.from_bytes(address[:8], "big")
        group = max(bisect_left(self._fence, prefix) - 1, 0)
        while True:  # the group before the first whose fence is >= prefix, then onward
            start = group * GROUP
            if start >= self.count:
                return self.count, b"", 0
            data = self.group(group)
            n = len(data) // SIZE
            i = bisect_left(range(n), address, key=lambda j: data[j * SIZE : j * SIZE + 32])
            if i < n:
                return start + i, data, i * SIZE
            group += 1

    def find(self, address: bytes, live: bytes | bytearray) -> tuple[int, Entry] | None:
        """The first record of ``address`` whose pack is live (``live[pack number]``): its
        number and its entry; None if there is none."""
        number, data, at = self._first(address)
        while number < self.count:
            if at < len(data):  # in the group already read: the usual case
                entry: Entry = ENTRY.unpack_from(data, at)
                at += SIZE
            else:  # a run of copies of one address past the group's end
                entry = self.entry_raw(number)
            if entry[0] != address:
                return None
            if live[entry[4]]:
                return number, entry
            number += 1
        return None

    def group(self, group: int) -> bytes:
        """The records of group ``group``, checked against its CRC."""
        start = group * GROUP
        n = min(GROUP, self.count - start)
        data = os.pread(self._fd, n * SIZE, self._records_at + start * SIZE)
        if len(data) != n * SIZE or zlib.crc32(data) != self._checks[group]:
            raise self._damaged(f"group {group}")
        return data

    def check(self) -> None:
        """Check every group (before the file is copied into another)."""
        for index, block in enumerate(self.blocks()):
            for at in range(0, len(block), GROUP * SIZE):
                group = index * (_BLOCK // GROUP) + at // (GROUP * SIZE)
                if zlib.crc32(block[at : at + GROUP * SIZE]) != self._checks[group]:
                    raise self._damaged(f"group {group}")

    def _damaged(self, where: str) -> DamagedTable:
        """The error for damage found in this file, which is removed first (if it is
        still the file at its path): the next opening reads the indexes instead."""
        try:
            here, there = os.fstat(self._fd), os.stat(self.path)
            if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        return DamagedTable(
            f"the local address table {self.path} is damaged ({where}) and was removed "
            "(the next run rebuilds it from the repository's indexes)"
        )

    def entry_raw(self, number: int) -> Entry:
        """Record ``number``: address, offset, stored length, plain length, pack number."""
        group, place = divmod(number, GROUP)
        address, offset, length, plain, pack = ENTRY.unpack_from(self.group(group), place * SIZE)
        return address, offset, length, plain, pack

    def pack_number(self, number: int) -> int:
        return self.entry_raw(number)[4]

    def entry(self, number: int) -> tuple[bytes, Location]:
        address, offset, length, plain, pack = self.entry_raw(number)
        return address, Location(self.packs[pack], offset, length, plain)

    def number_of(self, pack: str) -> int | None:
        """The number of ``pack`` in this file, None if it has none."""
        if self._numbers is None:
            self._numbers = {name: n for n, name in enumerate(self.packs)}
        return self._numbers.get(pack)

    def scan_pack(self, number: int) -> Iterator[int]:
        """The records of pack ``number``, by reading the whole file."""
        self.check()
        for index, block in enumerate(self.blocks()):
            first = index * _BLOCK
            for at in range(0, len(block), SIZE):
                if _PACK.unpack_from(block, at + RECORD.size)[0] == number:
                    yield first + at // SIZE

    def blocks(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Records ``start`` to ``end`` as they lie in the file, in blocks of whole records
        (``_BLOCK`` records each but the last)."""
        end = self.count if end is None else end
        step = _BLOCK
        for first in range(start, end, step):
            n = min(step, end - first)
            yield _read(self._fd, n * SIZE, self._records_at + first * SIZE)

    def __enter__(self) -> TableFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _read(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ValueError("truncated")
    return data


def write(
    path: Path,
    old: TableFile | None,
    keep: bytes | bytearray | None,
    new: Iterable[tuple[bytes, str]],
) -> TableFile:
    """Write a table file at ``path`` (atomically) and return it opened: the records of
    ``old`` (those whose pack ``keep`` marks, all if ``keep`` is None) merged with ``new``,
    pack header records (``RECORD``) each with its pack's name, sorted by address. The
    file returned is the one written, even if another process replaces ``path`` at once.

    Why a merge and not a sort: ``old`` may be far larger than memory; it is copied in
    blocks between the places where a new record goes, found by lookups."""
    if old is not None:
        old.check()  # its records are copied with fresh checks: they must be right
    packs = list(old.packs) if old is not None else []
    if keep is not None:
        # A pack left out is named no more: if gc gives it back its index, a later opening
        # must read that index rather than take the pack as held here.
        packs = [name if keep[n] else "" for n, name in enumerate(packs)]
    numbers = {name: n for n, name in enumerate(packs) if name}
    tmp = path.with_name(f".tmp-{secrets.token_hex(6)}")
    try:
        with open(tmp, "w+b", buffering=1 << 20) as out:
            out.write(bytes(_HEADER.size))
            count, copied = 0, 0
            places = _Places(old) if old is not None else None
            for record, pack in new:
                number = numbers.get(pack)
                if number is None:
                    number = numbers[pack] = len(packs)
                    packs.append(pack)
                if old is not None and places is not None:
                    at = places.first(record[:32])
                    count += _copy(out, old, copied, at, keep)
                    copied = at
                out.write(record)
                out.write(_PACK.pack(number))
                count += 1
            if old is not None:
                count += _copy(out, old, copied, old.count, keep)
            out.flush()
            fence, checks = _fence(out.fileno(), count)
            names = "\n".join(packs).encode("ascii")
            tail = fence + checks + names
            out.write(tail)
            out.seek(0)
            groups, meta = len(fence) // 8, zlib.crc32(tail)
            out.write(_HEADER.pack(MAGIC, count, groups, len(packs), len(names), meta))
        written = TableFile(tmp)
        try:
            os.replace(tmp, path)
        except BaseException:
            written.close()
            raise
        written.path = path
        return written
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: A temporary file older than this is a killed merge's (a live merge renames its own
#: within seconds, minutes at the largest sizes).
STALE_TEMPORARY = 3600.0


def remove_stale_temporaries(directory: Path) -> None:
    """Remove what killed merges left in ``directory`` (each as large as a table file)."""
    limit = time.time() - STALE_TEMPORARY
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.startswith(".tmp-") and entry.stat().st_mtime < limit:
                os.unlink(entry.path)
        except OSError:
            continue


class _Places:
    """:meth:`TableFile.first` for ascending addresses: each group of ``old`` is read once
    (a merge of as many new records as old ones asks each group ~64 times)."""

    def __init__(self, old: TableFile) -> None:
        self.old = old
        self.group = -1
        self.addresses: list[bytes] = []

    def first(self, address: bytes) -> int:
        old = self.old
        prefix = int.from_bytes(address[:8], "big")
        # Never back: the answer for an address is at least the one for the previous.
        group = max(bisect_left(old._fence, prefix) - 1, self.group, 0)
        while True:
            if group != self.group:
                if group * GROUP >= old.count:
                    return old.count
                data = old.group(group)
                self.addresses = [data[j : j + 32] for j in range(0, len(data), SIZE)]
                self.group = group
            i = bisect_left(self.addresses, address)
            if i < len(self.addresses):
                return group * GROUP + i
            group += 1


def _copy(out: object, old: TableFile, start: int, end: int, keep: bytes | bytearray | None) -> int:
    """Copy ``old``'s records ``start`` to ``end`` into ``out``, leaving out those whose
    pack ``keep`` does not mark; the number copied."""
    write = out.write  # type: ignore[attr-defined]
    if end - start <= GROUP and keep is None:  # between two new records: the usual case
        if end > start:
            write(_read(old._fd, (end - start) * SIZE, old._records_at + start * SIZE))
        return end - start
    copied = 0
    for block in old.blocks(start, end):
        if keep is None:
            write(block)
            copied += len(block) // SIZE
            continue
        view = memoryview(block)
        for at in range(0, len(block), SIZE):
            if keep[_PACK.unpack_from(block, at + RECORD.size)[0]]:
                write(view[at : at + SIZE])
                copied += 1
    return copied


def _fence(fd: int, count: int) -> tuple[bytes, bytes]:
    """The fence and the checks of the ``count`` records just written (read back from the
    page cache)."""
    fence = bytearray()
    checks: array[int] = array("I")
    step = GROUP * SIZE * 256
    for first in range(0, count * SIZE, step):
        block = _read(fd, min(step, count * SIZE - first), _HEADER.size + first)
        for at in range(0, len(block), GROUP * SIZE):
            fence += block[at : at + 8]
            checks.append(zlib.crc32(block[at : at + GROUP * SIZE]))
    if sys.byteorder == "big":
        checks.byteswap()
    return bytes(fence), checks.tobytes()


class DamagedTable(CorruptData):
    """The local address table's file failed its check (it was removed)."""


__all__ = ["GROUP", "DamagedTable", "TableFile", "write"]
