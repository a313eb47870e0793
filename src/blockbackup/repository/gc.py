"""gc: free the packs no snapshot uses, while backups, prunes and other gcs run.

Why this order (the argument is in docs/repository.md, "Concurrency without locks"): a pack
is first *condemned* (marker, then its index deleted, then the marker rewritten: its
backend time T), and deleted only by a sweep that, after reading T, lists the writers and
then the snapshots: no live writer may have started before T, and no snapshot listed then
may use it. A writer's commit refuses condemned packs. Every step is idempotent, so a gc
killed anywhere is finished by the next one.

Memory: the mark set (8 bytes per used blob), one pack header and one disk index segment
at a time; never the chunk store's table.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blockbackup.repository import catalog, condemned, writers
from blockbackup.repository.backend import DirectoryBackend, get_many
from blockbackup.repository.chunkstore import (
    decode_pack_header,
    index_key,
    pack_key,
    read_pack_header,
)
from blockbackup.repository.errors import CorruptData, NotFound, RepositoryError
from blockbackup.repository.keys import ZERO_ADDRESS
from blockbackup.repository.marks import MarkSet
from blockbackup.repository.repo import Repository
from blockbackup.repository.verify_select import record_key as verified_key

NOW_PREFIX = "gc/now-"
#: Leftover time probes of killed gcs older than this (backend seconds) are removed.
_PROBE_MAX_AGE = 3600.0

Entries = list[tuple[bytes, int, int, int]]
#: (step, done, total or None): what a progress display shows.
Progress = Callable[[str, int, "int | None"], None]
#: Called with a step name at each point another process may interleave (tests).
Hook = Callable[[str], None]


@dataclass
class GcReport:
    dry_run: bool
    snapshots: int = 0
    marked: int = 0
    packs: int = 0
    kept: int = 0
    too_new: int = 0
    damaged: int = 0
    condemned: int = 0
    restored: int = 0
    waiting: int = 0
    deleted: int = 0
    freed_bytes: int = 0
    indexes_written: int = 0
    dangling_indexes: int = 0
    temporaries_removed: int = 0
    writers: list[dict[str, Any]] = field(default_factory=list)
    ignored_writers: list[dict[str, Any]] = field(default_factory=list)
    removed_writers: list[dict[str, Any]] = field(default_factory=list)
    forgotten_writers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        would = "would be " if self.dry_run else ""
        return (
            f"{self.packs} packs: {self.deleted} {would}deleted ({self.freed_bytes} bytes "
            f"{would}freed), {self.condemned} {would}condemned, {self.waiting} condemned "
            f"waiting for writers, {self.restored} {would}restored, {self.kept} kept; "
            f"{self.snapshots} snapshots, {self.marked} used blobs"
        )


def _no_progress(step: str, done: int, total: int | None) -> None:
    pass


def _no_hook(step: str) -> None:
    pass


class _Gc:
    def __init__(self, repo: Repository, dry_run: bool, progress: Progress, hook: Hook) -> None:
        self.backend = repo.backend
        self.keys = repo.keys
        self.dry_run = dry_run
        self.progress = progress
        self.hook = hook
        self.marks = MarkSet()
        self.seen: set[str] = set()
        self.report = GcReport(dry_run)
        self._reported: set[str] = set()

    # -- time and writers ------------------------------------------------------------------

    def backend_now(self) -> float:
        """The backend's current time: the stamp of an object put now (never a host clock)."""
        key = NOW_PREFIX + secrets.token_hex(8)
        self.backend.put(key, b"")
        now = self.backend.modified(key)
        self.backend.delete(key)
        if now is None:
            raise RepositoryError("the backend lost gc's time probe: is another gc deleting it?")
        return now

    def live_writers(self, now: float) -> list[writers.Writer]:
        """Writer markers that defer deletions: not provably dead, not older than 24 h."""
        live = []
        for writer in writers.listed(self.backend):
            first = writer.id not in self._reported
            self._reported.add(writer.id)
            if writer.provably_dead():
                if not self.dry_run:
                    writers.retire(self.backend, writer.id)
                if first:
                    self.report.removed_writers.append(writer.to_json())
            elif now - writer.last_seen() > writers.STALE_AFTER:
                if first:
                    self.report.ignored_writers.append(writer.to_json())
            else:
                live.append(writer)
                if first:
                    self.report.writers.append(writer.to_json())
        return live

    # -- reading packs ----------------------------------------------------------------------

    def _decode(self, pack: str, header_blob: bytes | None, what: str) -> Entries | None:
        if header_blob is None:
            return None
        try:
            return decode_pack_header(self.keys, header_blob, f"{what} {pack}")
        except CorruptData:
            return None

    def headers(self) -> Iterator[tuple[str, Entries | None, bytes | None, bool]]:
        """(pack, entries or None if damaged, header blob, has an index) for every pack:
        the indexes (several at a time from S3), then the packs that have none (read from
        their end)."""
        indexed: set[str] = set()
        for key, header_blob in get_many(self.backend, list(self.backend.list("index/"))):
            pack = key.rsplit("/", 1)[1]
            if header_blob is None:
                continue  # condemned meanwhile: met again below as a pack without an index
            entries = self._decode(pack, header_blob, "index")
            if entries is not None:
                indexed.add(pack)
                yield pack, entries, header_blob, True
        for key in self.backend.list("data/"):
            pack = key.rsplit("/", 1)[1]
            if pack in indexed:
                continue
            try:
                from_pack = read_pack_header(self.backend, pack)
            except NotFound:
                continue
            yield pack, self._decode(pack, from_pack, "pack"), from_pack, False

    def _used(self, entries: Entries) -> bool:
        marks = self.marks
        return any(entry[0] in marks for entry in entries)

    # -- mark -------------------------------------------------------------------------------

    def mark(self, snapshot_ids: Iterable[str]) -> None:
        """Add the blobs of every snapshot not marked yet: its segments and their chunks."""
        segments: dict[bytes, list[str]] = {}
        new = [s for s in snapshot_ids if s not in self.seen]
        for n, (snapshot_id, manifest) in enumerate(
            catalog.read_each(self.backend, self.keys, new)
        ):
            self.progress("reading snapshots", n, len(new))
            if manifest is None:
                continue  # pruned meanwhile
            self.seen.add(snapshot_id)
            for disk in manifest.disks:
                for segment in disk.segments:
                    if segment != ZERO_ADDRESS:
                        segments.setdefault(segment, []).append(snapshot_id)
        self.report.snapshots = len(self.seen)
        if segments:
            self._mark_segments(segments)
        self.marks.finish()
        self.report.marked = len(self.marks)

    def _mark_segments(self, segments: dict[bytes, list[str]]) -> None:
        located: dict[bytes, tuple[str, int, int, int]] = {}
        for pack, entries, _blob, _indexed in self.headers():
            for address, offset, length, plain in entries or ():
                if address in segments:
                    located[address] = (pack, offset, length, plain)
            if len(located) == len(segments):
                break
        for n, (segment, users) in enumerate(segments.items()):
            self.progress("marking", n, len(segments))
            data = self._read_segment(segment, located.get(segment))
            if data is None:
                if any(self.backend.exists(catalog.PREFIX + s) for s in users):
                    raise RepositoryError(
                        f"snapshot {users[0]}: disk index segment {segment.hex()} cannot be "
                        "read, so gc cannot tell what it uses and frees nothing "
                        "(run verify)"
                    )
                continue  # every snapshot using it was pruned meanwhile
            self.marks.add(segment)
            self.marks.add_addresses(data)

    def _read_segment(
        self, address: bytes, location: tuple[str, int, int, int] | None
    ) -> bytes | None:
        from blockbackup.repository import blob  # lazy: only the mark step decodes

        if location is None:
            return None
        pack, offset, length, plain = location
        what = f"disk index segment {address.hex()} in pack {pack}"
        try:
            stored = self.backend.get(pack_key(pack), offset, length)
            data = blob.decode(self.keys, stored, address, what, plain)
        except (NotFound, CorruptData):
            return None
        if len(data) % 32 or self.keys.address(data) != address:
            return None
        return data

    # -- condemn ----------------------------------------------------------------------------

    def decide(self, horizon: float) -> None:
        """Condemn each unused pack older than the horizon (gc's start and every live
        writer's start: a younger pack may be a running backup's own)."""
        known = condemned.listed(self.backend)
        for n, (pack, entries, header_blob, has_index) in enumerate(self.headers()):
            self.progress("checking packs", n, None)
            mtime = self.backend.modified(pack_key(pack))
            if mtime is None:
                if has_index:  # its pack was deleted (a gc race): no one may use this index
                    self.report.dangling_indexes += 1
                    if not self.dry_run:
                        self.backend.delete(index_key(pack))
                continue
            self.report.packs += 1
            if entries is None or header_blob is None:
                self.report.damaged += 1  # never deleted: what it holds is unknown
                continue
            if pack in known:
                continue  # the sweep decides
            if self._used(entries):
                self.report.kept += 1
                if not has_index and mtime < horizon:
                    self._write_index(pack, header_blob)
                continue
            if mtime >= horizon:
                self.report.too_new += 1
                self.report.kept += 1
                continue
            self.report.condemned += 1
            if not self.dry_run:
                self.condemn(pack)

    def _write_index(self, pack: str, header_blob: bytes) -> None:
        """A used pack whose writer died before its index: write the index."""
        if self.dry_run or self.backend.exists(condemned.marker_key(pack)):
            return
        self.backend.put(index_key(pack), header_blob)
        self.report.indexes_written += 1

    def condemn(self, pack: str) -> None:
        """Marker, index gone, marker again: the second marker's time is after the first
        was visible, so a writer starting after it finds the marker at its commit."""
        marker = condemned.marker_key(pack)
        self.backend.put(marker, json.dumps({"pack": pack, "phase": 1}).encode())
        self.backend.delete(index_key(pack))
        self.backend.put(marker, json.dumps({"pack": pack, "phase": 2}).encode())

    # -- sweep ------------------------------------------------------------------------------

    def _markers(self) -> list[tuple[str, int, float]]:
        """(pack, phase, time) of each condemned marker; content first, then time: a later
        overwrite only makes the time later (more cautious)."""
        out = []
        for key in self.backend.list(condemned.PREFIX):
            pack = key.rsplit("/", 1)[1]
            try:
                content = json.loads(self.backend.get(key))
                phase = int(content.get("phase", 1)) if isinstance(content, dict) else 1
            except NotFound:
                continue
            except (ValueError, TypeError):
                phase = 1
            time = self.backend.modified(key)
            if time is not None:
                out.append((pack, phase, time))
        return out

    def sweep(self, now: float) -> None:
        """Delete condemned packs no live writer can rely on and no snapshot uses; restore
        condemned packs a snapshot uses again. Order: markers, writers, snapshots."""
        markers = self._markers()
        if not markers:
            return
        self.hook("markers-listed")
        live = self.live_writers(now)
        self.hook("writers-listed")
        self.mark(catalog.ids(self.backend))
        self.hook("before-delete")
        for n, (pack, phase, time) in enumerate(markers):
            self.progress("sweeping", n, len(markers))
            self._sweep_one(pack, phase, time, live)

    def _sweep_one(self, pack: str, phase: int, time: float, live: list[writers.Writer]) -> None:
        backend = self.backend
        marker = condemned.marker_key(pack)
        try:
            header_blob = read_pack_header(backend, pack)
        except NotFound:  # deleted by an earlier (killed) or a concurrent gc: finish it
            if not self.dry_run:
                backend.delete(index_key(pack))
                backend.delete(marker)
            return
        entries = self._decode(pack, header_blob, "pack")
        if entries is None or header_blob is None:
            self.report.damaged += 1
            return
        if self._used(entries):  # a snapshot committed meanwhile uses it: un-condemn
            self.report.restored += 1
            if not self.dry_run:
                backend.put(index_key(pack), header_blob)
                backend.delete(marker)
            return
        if phase != 2:  # a gc was killed while condemning: finish that first
            self.report.waiting += 1
            if not self.dry_run:
                backend.delete(index_key(pack))
                backend.put(marker, json.dumps({"pack": pack, "phase": 2}).encode())
            return
        if any(writer.time <= time for writer in live):
            self.report.waiting += 1
            return
        self.report.deleted += 1
        self.report.freed_bytes += backend.size(pack_key(pack)) or 0
        if not self.dry_run:
            backend.delete(index_key(pack))  # again: a loader may have written it back
            backend.delete(verified_key(pack))  # before the pack: a rerun finds it condemned
            backend.delete(pack_key(pack))
            backend.delete(marker)

    def clean_temporaries(self, horizon: float) -> None:
        """A directory's half-written files of killed puts: those older than an hour
        before the horizon (so before every live writer started) are no one's."""
        if isinstance(self.backend, DirectoryBackend) and not self.dry_run:
            self.report.temporaries_removed = self.backend.remove_temporaries(
                horizon - _PROBE_MAX_AGE
            )

    def clean_probes(self, now: float) -> None:
        for key in self.backend.list(NOW_PREFIX.rsplit("/", 1)[0] + "/"):
            if not key.startswith(NOW_PREFIX):
                continue
            time = self.backend.modified(key)
            if time is not None and now - time > _PROBE_MAX_AGE and not self.dry_run:
                self.backend.delete(key)


def collect(
    repo: Repository,
    dry_run: bool = False,
    forget_writers: Iterable[str] = (),
    progress: Progress = _no_progress,
    hook: Hook = _no_hook,
) -> GcReport:
    """One gc run: condemn what no snapshot uses, delete what an earlier run (or this one)
    condemned once no live writer can rely on it. Safe to kill and rerun."""
    gc = _Gc(repo, dry_run, progress, hook)
    for writer_id in forget_writers:
        if not repo.backend.exists(writers.PREFIX + writer_id):
            raise RepositoryError(f"no writer marker {writer_id!r} in the repository")
        if not dry_run:
            writers.retire(repo.backend, writer_id)
        gc.report.forgotten_writers.append(writer_id)
    now = gc.backend_now()
    live = gc.live_writers(now)
    horizon = min([now, *(w.time for w in live)])
    gc.mark(catalog.ids(repo.backend))
    hook("marked")
    gc.decide(horizon)
    hook("condemned")
    gc.sweep(now)
    gc.clean_probes(now)
    gc.clean_temporaries(horizon)
    return gc.report
