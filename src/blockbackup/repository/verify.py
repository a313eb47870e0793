"""Verify: re-read and re-check what snapshots need, and say exactly what damage affects.

Why per pack: each pack is read once, whole (one request, its name re-hashed: the keyless
check), and every blob the selected snapshots use in it is decoded and checked against its
address. Damage is then mapped back to every (snapshot, disk, offset) that uses it, so a
user knows which backups are hurt, not just that something is.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from blockbackup.repository import blob, directio, packhash
from blockbackup.repository.addresstable import Location
from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.chunkstore import ChunkStore, pack_key
from blockbackup.repository.diskindex import SEGMENT_ENTRIES, DiskIndex
from blockbackup.repository.errors import CorruptData, NotFound, RepositoryError
from blockbackup.repository.repo import Repository
from blockbackup.repository.verify_select import Chosen, Selection, choose, forget, record


@dataclass
class Damage:
    """One use of a damaged chunk (or disk index segment)."""

    snapshot: str
    disk: str
    offset: int | None  # None: the disk's index itself is damaged
    chunk: str
    error: str

    def to_json(self) -> dict[str, object]:
        return {
            "snapshot": self.snapshot,
            "disk": self.disk,
            "offset": self.offset,
            "chunk": self.chunk,
            "error": self.error,
        }


@dataclass
class Report:
    snapshots: int = 0
    chunks: int = 0
    packs: int = 0
    bytes_read: int = 0
    damaged_packs: dict[str, str] = field(default_factory=dict)
    damage: list[Damage] = field(default_factory=list)
    #: Snapshots whose manifest cannot be read: id -> why.
    damaged_snapshots: dict[str, str] = field(default_factory=dict)
    #: Packs not read: verified recently, or not in the sample.
    skipped_recent: int = 0
    skipped_sample: int = 0
    #: Why recording a passed pack failed (once; the check itself is unaffected).
    record_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.damage and not self.damaged_packs and not self.damaged_snapshots

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "chunks": self.chunks,
            "packs": self.packs,
            "bytes_read": self.bytes_read,
            "damaged_packs": self.damaged_packs,
            "damage": [d.to_json() for d in self.damage],
            "damaged_snapshots": self.damaged_snapshots,
            "skipped": {"verified_recently": self.skipped_recent, "sample": self.skipped_sample},
        }


def _indexes(
    repo: Repository, manifests: list[Manifest], report: Report, checked: Set[bytes] = frozenset()
) -> Iterator[tuple[Manifest, DiskRecord, DiskIndex]]:
    """(manifest, disk, DiskIndex) of every disk whose index segments read back intact
    (those in ``checked`` did already); a damaged segment is reported for its disk."""
    for manifest in manifests:
        for disk in manifest.disks:
            index = DiskIndex(repo.store, disk.size, disk.chunk_size, disk.segments)
            try:
                for segment, address in enumerate(disk.segments):
                    if address not in checked:
                        index.get(segment * SEGMENT_ENTRIES)  # loads and checks it
            except (CorruptData, NotFound) as exc:
                report.damage.append(Damage(manifest.id, disk.name, None, "", str(exc)))
                continue
            yield manifest, disk, index


def verify(
    repo: Repository,
    manifests: list[Manifest],
    progress: Callable[[int, int], None] | None = None,
    selection: Selection | None = None,
    unreadable: dict[str, str] | None = None,
) -> Report:
    """Check every chunk ``manifests`` use (of the packs ``selection`` chooses: default all);
    ``progress(done_packs, total_packs)``; ``unreadable``: manifests that could not be read
    (id -> why), reported as damage."""
    report = Report(snapshots=len(manifests) + len(unreadable or {}))
    report.damaged_snapshots = dict(unreadable or {})
    selection = selection or Selection()
    bad: dict[bytes, str] = {}
    needed = _Needed(repo.store)
    # Segments read and marked: a GiB unchanged since an earlier snapshot keeps its
    # segment, which is then neither read nor walked again (30 daily snapshots of a
    # mostly unchanged disk: about one snapshot's work, not thirty).
    walked: set[bytes] = set()
    for _m, _d, index in _indexes(repo, manifests, report, walked):
        for address in index.addresses(skip=walked):
            try:
                needed.add(address)
            except NotFound as exc:
                bad[address] = str(exc)
    report.chunks = needed.total + len(bad)
    now = datetime.now(UTC)
    chosen = _choose(repo, needed, selection, now, report)
    for pack in (*chosen.skipped_recent, *chosen.skipped_sample):
        _check_present(repo, pack, needed.blobs(pack), bad, report)
    total = len(chosen.packs)
    checks = check_packs(
        repo,
        ((pack, needed.blobs(pack)) for pack in chosen.packs),  # one pack's at a time
        now if selection.record else None,
    )
    for done, checked in enumerate(checks, 1):
        _merge(checked, bad, report)
        if progress is not None:
            progress(done, total)
    report.packs = total
    if bad:
        for manifest, disk, index in _indexes(repo, manifests, Report()):
            for i in range(index.chunks):
                address = index.get(i)
                if address in bad:
                    report.damage.append(
                        Damage(
                            manifest.id,
                            disk.name,
                            i * index.chunk_size,
                            address.hex(),
                            bad[address],
                        )
                    )
    return report


class _Needed:
    """The blobs a verify checks, by pack, in a bit per blob the repository holds.

    Why bits: a dict of address -> location for every chunk the snapshots use took ~240
    bytes per chunk (as the table did), on top of the table. Here an address marks the
    table's record of it; a pack's marked records become its blobs when the pack is
    checked. The blobs of condemned packs, outside the table (found by
    :meth:`ChunkStore.locate`), are rare and kept as they are.
    """

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.table = store.table
        self.marks = bytearray((self.table.records + 7) // 8)
        self.counts: dict[str, int] = defaultdict(int)
        self.elsewhere: dict[str, dict[bytes, Location]] = defaultdict(dict)
        self.total = 0

    def add(self, address: bytes) -> None:
        """Mark ``address`` (again: nothing more); NotFound if the repository lacks it."""
        number = self.table.record(address)
        if number < 0:
            location = self.store.locate(address)
            if address not in self.elsewhere[location.pack]:
                self.elsewhere[location.pack][address] = location
                self.counts[location.pack] += 1
                self.total += 1
            return
        byte, bit = divmod(number, 8)
        if not self.marks[byte] >> bit & 1:
            self.marks[byte] |= 1 << bit
            self.counts[self.table.pack_of(number)] += 1
            self.total += 1

    def packs(self) -> list[str]:
        return list(self.counts)

    def blobs(self, pack: str) -> dict[bytes, Location]:
        """The marked blobs of ``pack``."""
        out = dict(self.elsewhere.get(pack, {}))
        for number in self.store.records_of(pack):
            if self.marks[number >> 3] >> (number & 7) & 1:
                address, location = self.table.entry(number)
                out[address] = location
        return out


def _choose(
    repo: Repository, needed: _Needed, selection: Selection, now: datetime, report: Report
) -> Chosen:
    """The packs to read (sorted), counting in ``report`` those left out."""
    chosen = choose(repo, needed.packs(), selection, now)
    report.skipped_recent = len(chosen.skipped_recent)
    report.skipped_sample = len(chosen.skipped_sample)
    for pack in (*chosen.skipped_recent, *chosen.skipped_sample):
        report.chunks -= needed.counts[pack]  # only what was checked counts
    return chosen


def _check_present(
    repo: Repository,
    pack: str,
    blobs: dict[bytes, Location],
    bad: dict[bytes, str],
    report: Report,
) -> None:
    """A pack left out of the reading still exists, as long as its blobs need (one
    metadata request, no data): skipping re-reads must not hide a pack that is gone."""
    size = repo.backend.size(pack_key(pack))
    if size is None:
        report.damaged_packs[pack] = "missing"
        why = f"pack {pack} is missing"
    elif size < max(loc.offset + loc.length for loc in blobs.values()):
        report.damaged_packs[pack] = "truncated"
        why = f"pack {pack} is truncated"
    else:
        return
    for address in blobs:
        bad[address] = why


@dataclass
class PackCheck:
    """What checking one pack found: bytes read, the pack's own damage, damaged blobs."""

    pack: str
    bytes_read: int = 0
    damaged: str | None = None
    bad: dict[bytes, str] = field(default_factory=dict)
    #: Why recording the result failed (the check itself is unaffected).
    record_error: str | None = None

    @property
    def passed(self) -> bool:
        return self.damaged is None and not self.bad


#: Packs checked at once: reading, hashing and decompressing release the GIL, so two
#: cores are both busy; each pack in flight holds its bytes (about 16 MiB).
VERIFY_THREADS = 3


def check_packs(
    repo: Repository,
    packs: Iterable[tuple[str, dict[bytes, Location]]],
    record_at: datetime | None = None,
) -> Iterator[PackCheck]:
    """Check packs (each: its name and the blobs to decode in it) in parallel threads,
    read whole, one request each; results come in the order given. At most
    ``VERIFY_THREADS`` + 1 packs are in memory. ``record_at``: record each pack that
    passed as verified then, and forget the record of each that did not (in the same
    thread, so those small durable writes overlap the other packs' checks)."""
    with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="bb-verify") as pool:
        pending: deque[Future[PackCheck]] = deque()
        for pack, blobs in packs:
            pending.append(pool.submit(_check_and_record, repo, pack, blobs, record_at))
            if len(pending) > VERIFY_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _check_and_record(
    repo: Repository, pack: str, blobs: dict[bytes, Location], record_at: datetime | None
) -> PackCheck:
    """:func:`check_pack`, then write ``verified/<pack>`` if it passed or remove an older
    record if it did not (so a later ``--skip-verified-within`` reads it again)."""
    checked = check_pack(repo, pack, blobs, _read_buffer())
    if record_at is not None:
        try:
            if checked.passed:
                record(repo, pack, record_at)
            else:
                forget(repo, pack)
        except (OSError, RepositoryError) as exc:
            checked.record_error = str(exc)
    return checked


def _merge(checked: PackCheck, bad: dict[bytes, str], report: Report) -> None:
    report.bytes_read += checked.bytes_read
    if checked.damaged is not None:
        report.damaged_packs[checked.pack] = checked.damaged
    bad.update(checked.bad)
    if report.record_error is None:
        report.record_error = checked.record_error


_local = threading.local()


def _read_buffer() -> directio.ReadBuffer:
    """The calling pool thread's memory for whole packs (each done with before the next;
    it goes with the thread when :func:`check_packs` ends)."""
    buffer: directio.ReadBuffer | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = directio.ReadBuffer()
    return buffer


def check_pack(
    repo: Repository,
    pack: str,
    blobs: dict[bytes, Location],
    into: directio.ReadBuffer | None = None,
) -> PackCheck:
    """Read ``pack`` whole (into ``into``'s memory, if given), check it against its name
    (the keyless check), and decode and check each of ``blobs`` in it. Touches nothing
    shared: safe in parallel threads."""
    checked = PackCheck(pack)
    try:
        data = memoryview(repo.backend.get_buffer(pack_key(pack), into=into))
    except NotFound:
        checked.damaged = "missing"
        for address in blobs:
            checked.bad[address] = f"pack {pack} is missing"
        return checked
    checked.bytes_read = len(data)
    if packhash.name_of(data, repo.pack_hash) != pack:
        checked.damaged = "content does not match its name"
    for address, location in blobs.items():
        stored = data[location.offset : location.offset + location.length]
        what = f"chunk {address.hex()} in pack {pack}"
        try:
            if len(stored) != location.length:
                raise CorruptData(f"{what}: the pack is truncated")
            plain = blob.decode(repo.keys, stored, address, what, location.plain)
            if len(plain) != location.plain or repo.keys.address(plain) != address:
                raise CorruptData(f"{what}: content does not match its address")
        except CorruptData as exc:
            checked.bad[address] = str(exc)
    return checked


__all__ = [
    "Damage",
    "PackCheck",
    "Report",
    "RepositoryError",
    "check_pack",
    "check_packs",
    "verify",
]
