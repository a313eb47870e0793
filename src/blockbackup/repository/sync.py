"""Copy a repository into another place (directory <-> S3, S3 <-> S3): what it lacks only.

Why it needs no key: every object is copied as stored bytes, and the one check that matters
in transit is keyless: a pack's bytes hash to its name (SHA-256), and its index is the
header blob at its end. So a sync host never sees plaintext, and a damaged source pack is
refused rather than spread.

Order (the repository's write order, so a sync killed at any point leaves a valid
repository that a rerun completes): key slots, then ``config`` (a new destination is a
repository with no snapshots from here on), packs each followed by its index, then the
remaining indexes, then snapshot manifests last. A destination with another repository id
is refused. Removals are not mirrored: a snapshot pruned at the source stays at the
destination until pruned there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from blockbackup.repository import packhash
from blockbackup.repository.backend import Backend
from blockbackup.repository.chunkstore import PACK_END, PACK_MAGIC, index_key, pack_key
from blockbackup.repository.errors import AlreadyExists, CorruptData, NotFound, RepositoryError
from blockbackup.repository.repo import Repository

_TRAILER = 12  # u32le header length + "BBPKEND1"


class RateLimiter:
    """At most ``rate`` bytes per second on average across threads (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self.pack_hash = packhash.VERSION_1  # the source's, once its config is read
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


@dataclass
class SyncReport:
    created: bool = False
    keys: int = 0
    packs: int = 0
    indexes: int = 0
    snapshots: int = 0
    bytes: int = 0
    requests: dict[str, dict[str, int] | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "keys": self.keys,
            "packs": self.packs,
            "indexes": self.indexes,
            "snapshots": self.snapshots,
            "bytes": self.bytes,
            "requests": self.requests,
        }


def header_of_pack(pack: str, data: bytes, pack_hash: str) -> bytes:
    """The pack's header blob (what ``index/<pack>`` holds), after the keyless checks
    (``pack_hash``: the repository's pack-name hash)."""
    if packhash.name_of(data, pack_hash) != pack:
        raise CorruptData(f"pack {pack}: its content does not match its name")
    if not data.startswith(PACK_MAGIC) or data[-8:] != PACK_END:
        raise CorruptData(f"pack {pack}: not a pack")
    length = int.from_bytes(data[-_TRAILER:-8], "little")
    start = len(data) - _TRAILER - length
    if start < len(PACK_MAGIC):
        raise CorruptData(f"pack {pack}: its header length is wrong")
    return data[start : len(data) - _TRAILER]


def _leaf(key: str) -> str:
    return key.rsplit("/", 1)[1]


class _Sync:
    def __init__(
        self,
        src: Backend,
        dst: Backend,
        limiter: RateLimiter,
        report: SyncReport,
        progress: Callable[[str, int, int], None],
    ) -> None:
        self.src, self.dst, self.limiter = src, dst, limiter
        self.report, self.progress = report, progress
        self._lock = threading.Lock()

    def _put(self, key: str, data: bytes, if_absent: bool = False) -> None:
        self.limiter.take(len(data))
        if if_absent:
            try:
                self.dst.put_if_absent(key, data)
            except AlreadyExists:
                return
        else:
            self.dst.put(key, data)
        with self._lock:
            self.report.bytes += len(data)

    def copy_pack(self, pack: str, src_has_index: bool) -> None:
        try:
            data = self.src.get(pack_key(pack))
        except NotFound:
            return  # removed by gc at the source since the listing
        try:
            header = header_of_pack(pack, data, self.pack_hash)
        except CorruptData as exc:
            raise CorruptData(
                f"{exc} (in {self.src.describe()}): nothing after it was copied and no "
                "snapshot; repair the source (verify names what it damages) and sync again"
            ) from None
        self._put(pack_key(pack), data)
        if src_has_index:
            self._put(index_key(pack), header)
        with self._lock:
            self.report.packs += 1
            self.report.indexes += int(src_has_index)

    def run(self, workers: int) -> None:
        src, dst, report = self.src, self.dst, self.report
        config_bytes = src.get("config")
        config = Repository.read_config(src)
        self.pack_hash = packhash.of_config(config)
        if dst.exists("config"):
            theirs = Repository.read_config(dst)
            if theirs["id"] != config["id"]:
                raise RepositoryError(
                    f"{dst.describe()} is another repository (id {theirs['id']}, the source's "
                    f"is {config['id']}): sync only updates a copy of the same repository"
                )
        else:
            if any(True for _ in dst.list("")):
                raise RepositoryError(
                    f"{dst.describe()} is not empty and not a copy of this repository"
                )
            report.created = True

        have_keys = {_leaf(k) for k in dst.list("keys/")}
        for key in sorted(src.list("keys/")):
            if _leaf(key) not in have_keys:
                self._put(key, src.get(key), if_absent=True)
                report.keys += 1
        if report.created:
            self._put("config", config_bytes, if_absent=True)

        src_packs = {_leaf(k) for k in src.list("data/")}
        src_indexes = {_leaf(k) for k in src.list("index/")}
        dst_packs = {_leaf(k) for k in dst.list("data/")}
        dst_indexes = {_leaf(k) for k in dst.list("index/")}
        todo = sorted(src_packs - dst_packs)
        self.progress("packs", 0, len(todo))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self.copy_pack, p, p in src_indexes) for p in todo]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in done:
                f.result()  # the first error, raised
            for f in futures:
                f.result()
        self.progress("packs", len(todo), len(todo))

        # indexes whose pack the destination already had (an earlier sync cut between them)
        for pack in sorted((src_indexes & dst_packs) - dst_indexes):
            try:
                self._put(index_key(pack), src.get(index_key(pack)))
            except NotFound:
                continue
            report.indexes += 1

        have_snaps = {_leaf(k) for k in dst.list("snapshots/")}
        for key in sorted(src.list("snapshots/")):
            if _leaf(key) not in have_snaps:
                try:
                    self._put(key, src.get(key), if_absent=True)
                except NotFound:
                    continue  # pruned at the source since the listing
                report.snapshots += 1


def sync(
    src: Backend,
    dst: Backend,
    limit_rate: float | None = None,
    workers: int = 4,
    progress: Callable[[str, int, int], None] | None = None,
) -> SyncReport:
    """Make ``dst`` hold everything ``src`` holds (see the module doc for the order)."""
    report = SyncReport()
    _Sync(src, dst, RateLimiter(limit_rate), report, progress or (lambda *_: None)).run(workers)
    for name, backend in (("source", src), ("dest", dst)):
        counter = getattr(backend, "requests", None)
        report.requests[name] = counter() if callable(counter) else None
    return report


__all__ = ["RateLimiter", "SyncReport", "header_of_pack", "sync"]
