"""Verify: re-read and re-check what snapshots need, and say exactly what damage affects.

Why per pack: each pack is read once, whole (one request, its name re-hashed: the keyless
check), and every blob the selected snapshots use in it is decoded and checked against its
address. Damage is then mapped back to every (snapshot, disk, offset) that uses it, so a
user knows which backups are hurt, not just that something is.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from blockbackup.repository import blob
from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.chunkstore import Location, pack_key
from blockbackup.repository.diskindex import SEGMENT_ENTRIES, DiskIndex
from blockbackup.repository.errors import CorruptData, NotFound, RepositoryError
from blockbackup.repository.keys import ZERO_ADDRESS
from blockbackup.repository.repo import Repository

#: Packs fetched ahead of the one being checked.
READ_AHEAD = 2


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

    @property
    def ok(self) -> bool:
        return not self.damage and not self.damaged_packs

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "chunks": self.chunks,
            "packs": self.packs,
            "bytes_read": self.bytes_read,
            "damaged_packs": self.damaged_packs,
            "damage": [d.to_json() for d in self.damage],
        }


def _indexes(
    repo: Repository, manifests: list[Manifest], report: Report
) -> Iterator[tuple[Manifest, DiskRecord, DiskIndex]]:
    """(manifest, disk, DiskIndex) of every disk whose index segments read back intact;
    a damaged segment is reported for its disk."""
    for manifest in manifests:
        for disk in manifest.disks:
            index = DiskIndex(repo.store, disk.size, disk.chunk_size, disk.segments)
            try:
                for segment in range(len(disk.segments)):
                    index.get(segment * SEGMENT_ENTRIES)  # loads and checks it
            except (CorruptData, NotFound) as exc:
                report.damage.append(Damage(manifest.id, disk.name, None, "", str(exc)))
                continue
            yield manifest, disk, index


def verify(
    repo: Repository,
    manifests: list[Manifest],
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Check every chunk ``manifests`` use; ``progress(done_packs, total_packs)``."""
    report = Report(snapshots=len(manifests))
    bad: dict[bytes, str] = {}
    needed: dict[str, dict[bytes, Location]] = defaultdict(dict)
    for _m, _d, index in _indexes(repo, manifests, report):
        for i in range(index.chunks):
            address = index.get(i)
            if address == ZERO_ADDRESS:
                continue
            try:
                location = repo.store.locate(address)
            except NotFound as exc:
                bad[address] = str(exc)
                continue
            needed[location.pack][address] = location
    report.chunks = sum(len(v) for v in needed.values()) + len(bad)
    total = len(needed)
    # the next packs are fetched while one is checked (object storage's latency overlaps
    # the hashing and decoding); at most READ_AHEAD + 1 packs are held
    items = iter(sorted(needed.items()))
    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="bb-verify") as pool:
        queue: deque[tuple[str, dict[bytes, Location], Future[bytes | None]]] = deque()

        def ask() -> None:
            item = next(items, None)
            if item is not None:
                queue.append((item[0], item[1], pool.submit(_fetch, repo, item[0])))

        for _ in range(READ_AHEAD):
            ask()
        done = 0
        while queue:
            pack, blobs, future = queue.popleft()
            ask()
            _check_pack(repo, pack, blobs, future.result(), bad, report)
            done += 1
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


def _fetch(repo: Repository, pack: str) -> bytes | None:
    """A pack's bytes, None if it is missing."""
    try:
        return repo.backend.get(pack_key(pack))
    except NotFound:
        return None


def _check_pack(
    repo: Repository,
    pack: str,
    blobs: dict[bytes, Location],
    data: bytes | None,
    bad: dict[bytes, str],
    report: Report,
) -> None:
    if data is None:
        report.damaged_packs[pack] = "missing"
        for address in blobs:
            bad[address] = f"pack {pack} is missing"
        return
    report.bytes_read += len(data)
    if hashlib.sha256(data).hexdigest() != pack:
        report.damaged_packs[pack] = "content does not match its name"
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
            bad[address] = str(exc)


__all__ = ["Damage", "Report", "RepositoryError", "verify"]
