"""Snapshot manifests: the commit point of a backup, and how snapshots are found.

A snapshot exists exactly when ``snapshots/<id>`` exists; it is written last, in one atomic
``put_if_absent``, after every pack and index it names is durable. Ids sort by time and
carry random bits, so hosts never collide.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from blockbackup.repository import blob
from blockbackup.repository.backend import Backend, get_many
from blockbackup.repository.errors import CorruptData, NotFound, RepositoryError
from blockbackup.repository.keys import Keys

MANIFEST_VERSION = 1
PREFIX = "snapshots/"


@dataclass
class DiskRecord:
    """One disk of a snapshot: its name, size and disk index segments."""

    name: str
    size: int
    chunk_size: int
    segments: list[bytes]
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "segments": [s.hex() for s in self.segments],
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DiskRecord:
        return cls(
            name=str(data["name"]),
            size=int(data["size"]),
            chunk_size=int(data["chunk_size"]),
            segments=[bytes.fromhex(s) for s in data["segments"]],
            source=dict(data.get("source") or {}),
        )


@dataclass
class Manifest:
    id: str
    time: str
    host: str
    disks: list[DiskRecord]
    tags: dict[str, str] = field(default_factory=dict)

    def disk(self, name: str | None) -> DiskRecord:
        if name is None:
            if len(self.disks) != 1:
                names = ", ".join(d.name for d in self.disks)
                raise RepositoryError(f"snapshot {self.id} has several disks ({names}): name one")
            return self.disks[0]
        for disk in self.disks:
            if disk.name == name:
                return disk
        raise RepositoryError(f"snapshot {self.id} has no disk {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "id": self.id,
            "time": self.time,
            "host": self.host,
            "disks": [d.to_json() for d in self.disks],
            "tags": self.tags,
        }


def new_id(now: datetime | None = None) -> tuple[str, str]:
    """(id, ISO time) for a new snapshot."""
    now = now or datetime.now(UTC)
    # microseconds: two snapshots of one host in one second still sort in commit order
    snapshot_id = f"{now:%Y%m%dT%H%M%S}.{now:%f}Z-{secrets.token_hex(4)}"
    return snapshot_id, now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _aad(snapshot_id: str) -> bytes:
    return f"snapshot:{snapshot_id}".encode()


def write(backend: Backend, keys: Keys, manifest: Manifest) -> None:
    data = json.dumps(manifest.to_json(), sort_keys=True).encode()
    backend.put_if_absent(PREFIX + manifest.id, blob.encode(keys, data, _aad(manifest.id)))


def read(backend: Backend, keys: Keys, snapshot_id: str) -> Manifest:
    return _decode(keys, snapshot_id, backend.get(PREFIX + snapshot_id))


def read_each(
    backend: Backend, keys: Keys, snapshot_ids: list[str]
) -> Iterator[tuple[str, Manifest | None]]:
    """Each snapshot's manifest (None: pruned meanwhile), in order, fetched several at a
    time from a remote backend (``backend.get_many``); a damaged one raises."""
    for snapshot_id, stored in _stored_each(backend, snapshot_ids):
        yield snapshot_id, None if stored is None else _decode(keys, snapshot_id, stored)


def _stored_each(backend: Backend, snapshot_ids: list[str]) -> Iterator[tuple[str, bytes | None]]:
    """Each snapshot's stored manifest (None: pruned meanwhile), in order (``get_many``)."""
    for key, stored in get_many(backend, [PREFIX + s for s in snapshot_ids]):
        yield key.removeprefix(PREFIX), stored


def _decode(keys: Keys, snapshot_id: str, stored: bytes) -> Manifest:
    what = f"snapshot {snapshot_id}"
    data = blob.decode(keys, stored, _aad(snapshot_id), what, 1 << 28)
    try:
        obj = json.loads(data)
        if obj.get("version") != MANIFEST_VERSION:
            raise RepositoryError(f"{what}: manifest version {obj.get('version')} unsupported")
        if obj["id"] != snapshot_id:
            raise CorruptData(f"{what}: manifest names another snapshot")
        return Manifest(
            id=snapshot_id,
            time=str(obj["time"]),
            host=str(obj["host"]),
            disks=[DiskRecord.from_json(d) for d in obj["disks"]],
            tags=dict(obj.get("tags") or {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptData(f"{what}: manifest is damaged: {exc}") from None


def read_many(
    backend: Backend,
    keys: Keys,
    snapshot_ids: list[str],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Manifest], dict[str, str]]:
    """(the manifests that read back intact, id -> why each other one cannot be read).

    Why not raise: one damaged manifest (bit rot, a truncated object) must not stop a
    listing, a verify or a prune of every other snapshot; the caller names it instead.
    A manifest that vanished meanwhile (a concurrent prune) is simply not there any more.
    """
    manifests: list[Manifest] = []
    damaged: dict[str, str] = {}
    for done, (snapshot_id, stored) in enumerate(_stored_each(backend, snapshot_ids), 1):
        if progress is not None:
            progress(done, len(snapshot_ids))
        if stored is None:
            continue
        try:
            manifests.append(_decode(keys, snapshot_id, stored))
        except RepositoryError as exc:  # CorruptData, or a version this one cannot read
            damaged[snapshot_id] = str(exc).removeprefix(f"snapshot {snapshot_id}: ")
    return manifests, damaged


def ids(backend: Backend) -> list[str]:
    """Every committed snapshot id, oldest first."""
    return sorted(k.removeprefix(PREFIX) for k in backend.list(PREFIX))


def resolve(backend: Backend, spec: str) -> str:
    """A snapshot id from ``latest``, a full id or a unique id prefix."""
    known = ids(backend)
    if spec == "latest":
        if not known:
            raise NotFound("the repository has no snapshots")
        return known[-1]
    if spec in known:
        return spec
    matches = [i for i in known if i.startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(f"no snapshot {spec!r} in the repository")
    raise RepositoryError(f"snapshot {spec!r} is ambiguous: {', '.join(matches)}")


def latest_with_disk(backend: Backend, keys: Keys, disk: str) -> Manifest | None:
    """The newest snapshot that holds a disk called ``disk`` (the base of an incremental).

    A damaged manifest on the way is an error, never skipped: it may be the newest snapshot
    of ``disk``, and an older one in its place would be a wrong base for an incremental.
    """
    for snapshot_id in reversed(ids(backend)):
        try:
            manifest = read(backend, keys, snapshot_id)
        except NotFound:
            continue  # pruned meanwhile
        except CorruptData as exc:
            raise CorruptData(
                f"{exc}; it may be the newest snapshot of disk {disk}, so 'latest' cannot "
                "be resolved: name a snapshot (a backup: --base ID or --base none)"
            ) from None
        if any(d.name == disk for d in manifest.disks):
            return manifest
    return None
