"""The repository facade: create or open one, its keys, its chunk store, its snapshots.

Opening checks the ``config`` (format name and version) before anything else, so a path
that is not a repository, or one written by a newer blockbackup, is refused with one clear
sentence and nothing is written.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from blockbackup.repository import catalog, condemned, packhash, refs, writers
from blockbackup.repository import keys as keymod
from blockbackup.repository.backend import Backend, exists_many, open_backend
from blockbackup.repository.cache import index_cache, table_path
from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.chunkstore import DEFAULT_PACK_SIZE, ChunkStore, pack_key
from blockbackup.repository.errors import (
    AlreadyExists,
    FormatTooNew,
    NotARepository,
    NotFound,
    RepositoryError,
)
from blockbackup.repository.keys import Keys

FORMAT = "blockbackup-repository"
#: 2: packs are named by the hash in ``pack_hash`` (BLAKE3); 1: by SHA-256.
VERSION = 2
CHUNK_SIZE = 64 * 1024
#: Storage settings for ``open_backend`` (endpoint, region, addressing-style), or None.
StorageOptions = Mapping[str, str | None] | None
_CONFIG_KEYS = {
    "format",
    "version",
    "id",
    "chunk_size",
    "pack_size",
    "encryption",
    "compression",
    "created",
}
#: Keys a config has from a version on.
_CONFIG_KEYS_SINCE = {"pack_hash": 2}


@contextmanager
def _backend_at(location: str, options: StorageOptions) -> Iterator[Backend]:
    """A backend for a few reads, closed after them."""
    backend = open_backend(location, options)
    try:
        yield backend
    finally:
        backend.close()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Repository:
    """One open repository. Blocking methods: call them from a thread in async code."""

    def __init__(self, backend: Backend, config: dict[str, Any], keys: Keys) -> None:
        self.backend = backend
        self.config = config
        self.keys = keys
        self.id: str = config["id"]
        self.chunk_size: int = config["chunk_size"]
        self.pack_hash = packhash.of_config(config)
        self._store: ChunkStore | None = None
        #: This process's writer marker (``writers/<id>``), while it writes.
        self.writer_id: str | None = None
        self._last_beat = 0.0

    def close(self) -> None:
        """Give back the backend's connections and threads (the writer marker is
        :meth:`retire_writer`'s). Idempotent; the object is not used after it."""
        if self._store is not None:
            self._store.close()
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _new_store(self) -> ChunkStore:
        return ChunkStore(
            self.backend,
            self.keys,
            int(self.config["pack_size"]),
            self.pack_hash,
            table_path(self.id),
        )

    # -- create and open --------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        location: str,
        secret: bytes | None,
        kind: str = "passphrase",
        pack_size: int = DEFAULT_PACK_SIZE,
        kdf: str = keymod.DEFAULT_KDF,
        options: StorageOptions = None,
    ) -> Repository:
        """Create a repository; ``secret`` None means unencrypted; ``options``: the
        storage settings (``backend.open_backend``)."""
        backend = open_backend(location, options)
        if backend.exists("config"):
            raise RepositoryError(f"{location} is already a repository")
        if any(True for _ in backend.list("")):
            raise RepositoryError(f"{location} is not empty: a repository needs its own place")
        config: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "id": secrets.token_hex(16),
            "chunk_size": CHUNK_SIZE,
            "pack_size": pack_size,
            "encryption": "aes-256-gcm" if secret is not None else "none",
            "compression": "zstd",
            "created": _now(),
            "pack_hash": packhash.ALGORITHMS[0],
        }
        master = None
        if secret is not None:
            master = keymod.new_master_key()
            slot_id = secrets.token_hex(4)
            slot = keymod.make_slot(master, secret, kind, config["id"], slot_id, kdf=kdf)
            backend.put_if_absent(f"keys/{slot_id}", json.dumps(slot).encode())
        # config last: a half-made repository (killed during init) is not a repository
        try:
            backend.put_if_absent("config", json.dumps(config, indent=1).encode())
        except AlreadyExists:
            raise RepositoryError(f"{location} is already a repository") from None
        return cls(backend, config, Keys(master))

    @staticmethod
    def read_config(backend: Backend) -> dict[str, Any]:
        where = backend.describe()
        try:
            config = json.loads(backend.get("config"))
        except (NotFound, OSError, ValueError):
            raise NotARepository(f"{where} is not a blockbackup repository") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise NotARepository(f"{where} is not a blockbackup repository")
        version = config.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise FormatTooNew(
                f"{where}: repository format version {version} is newer than this "
                f"blockbackup supports ({VERSION}): upgrade blockbackup"
            )
        expected = _CONFIG_KEYS | {k for k, v in _CONFIG_KEYS_SINCE.items() if version >= v}
        if set(config) != expected or packhash.of_config(config) not in packhash.ALGORITHMS:
            raise NotARepository(f"{where}: repository config is damaged or unknown")
        return config

    @classmethod
    def open(
        cls, location: str, secret: bytes | None = None, options: StorageOptions = None
    ) -> Repository:
        backend = open_backend(location, options)
        try:
            config = cls.read_config(backend)
            if config["encryption"] == "none":
                return cls(backend, config, Keys(None))
            if secret is None:
                raise RepositoryError(
                    f"{location} is encrypted: give a passphrase or key file to open it"
                )
            master, _slot = keymod.unlock(cls._slots(backend), secret, config["id"])
            return cls(backend, config, Keys(master))
        except BaseException:
            backend.close()
            raise

    @classmethod
    def unlock_ahead(cls, location: str, secret: bytes, options: StorageOptions = None) -> None:
        """Start unlocking in a thread what a coming :meth:`open` with ``secret`` unlocks
        (:func:`keys.unlock_ahead`: for a command line process, not a daemon)."""
        with _backend_at(location, options) as backend:
            config = cls.read_config(backend)
            keymod.unlock_ahead(cls._slots(backend), secret, config["id"])

    @staticmethod
    def is_encrypted_at(location: str, options: StorageOptions = None) -> bool:
        with _backend_at(location, options) as backend:
            return bool(Repository.read_config(backend)["encryption"] != "none")

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def _slots(backend: Backend) -> dict[str, dict[str, Any]]:
        slots = {}
        for key in backend.list("keys/"):
            slot_id = key.removeprefix("keys/")
            try:
                slots[slot_id] = keymod.parse_slot(backend.get(key), slot_id)
            except NotFound:
                continue
        return slots

    @classmethod
    def key_slots_at(
        cls, location: str, options: StorageOptions = None
    ) -> dict[str, dict[str, Any]]:
        """The key slots of a repository, read without a key (they hold nothing secret)."""
        with _backend_at(location, options) as backend:
            cls.read_config(backend)
            return cls._slots(backend)

    def key_slots(self) -> dict[str, dict[str, Any]]:
        return self._slots(self.backend)

    def add_key(
        self,
        secret: bytes,
        kind: str = "passphrase",
        comment: str = "",
        kdf: str = keymod.DEFAULT_KDF,
    ) -> str:
        if self.keys.master is None:
            raise RepositoryError("the repository is not encrypted: it has no keys")
        slot_id = secrets.token_hex(4)
        slot = keymod.make_slot(self.keys.master, secret, kind, self.id, slot_id, comment, kdf)
        self.backend.put_if_absent(f"keys/{slot_id}", json.dumps(slot).encode())
        return slot_id

    def remove_key(self, slot_id: str) -> None:
        slots = self.key_slots()
        if slot_id not in slots:
            raise NotFound(f"no key slot {slot_id!r}")
        if len(slots) == 1:
            raise RepositoryError("cannot remove the last key slot: the data would be lost")
        self.backend.delete(f"keys/{slot_id}")

    # -- writers (gc defers deleting what they may rely on) --------------------------------

    def announce_writer(self) -> None:
        """Put this writer's ``writers/<id>`` marker; call before the store is loaded."""
        if self.writer_id is None:
            self.writer_id = writers.announce(self.backend)
            self._last_beat = time.monotonic()

    def beat_writer(self) -> None:
        """Re-put the writer's heartbeat if an hour passed (a writer running for days
        stays protected); cheap to call on every write."""
        now = time.monotonic()
        if self.writer_id is not None and now - self._last_beat >= writers.HEARTBEAT:
            writers.beat(self.backend, self.writer_id)
            self._last_beat = now

    def retire_writer(self) -> None:
        """Delete the marker, after the commit or the failure. Idempotent."""
        if self.writer_id is not None:
            writers.retire(self.backend, self.writer_id)
            self.writer_id = None

    def _refused_packs(self, disks: list[DiskRecord], relied: set[str]) -> list[str]:
        """The packs the new snapshot relies on (its own, and every pack its disks name)
        that gc condemned or removed. Condemned markers are checked before existence: a
        pack is deleted only after its marker was visible, and its marker after it."""
        try:
            relied = relied | refs.referenced_packs(self.store, disks)
        except RepositoryError:  # this object's table may predate another writer's packs
            fresh = self._new_store()
            fresh.load(index_cache(self.backend, self.id))
            relied = relied | refs.referenced_packs(fresh, disks)
        condemned_now = condemned.listed(self.backend) & relied
        if condemned_now:
            raise RepositoryError(
                f"{len(condemned_now)} pack(s) this backup relies on were condemned by a "
                f"concurrent gc (e.g. {min(condemned_now)}); nothing was committed: "
                "run the backup again"
            )
        return self._missing_packs(relied)

    # -- chunks and snapshots ---------------------------------------------------------------

    @property
    def store(self) -> ChunkStore:
        """The chunk store, loaded (every pack index read) on first use."""
        if self._store is None:
            store = self._new_store()
            store.load(index_cache(self.backend, self.id))
            self._store = store
        return self._store

    def snapshot_ids(self) -> list[str]:
        return catalog.ids(self.backend)

    def manifest(self, snapshot_id: str) -> Manifest:
        return catalog.read(self.backend, self.keys, snapshot_id)

    def snapshots(self) -> list[Manifest]:
        """Every snapshot's manifest (one pruned since the listing is left out)."""
        each = catalog.read_each(self.backend, self.keys, self.snapshot_ids())
        return [manifest for _id, manifest in each if manifest is not None]

    def select(self, spec: str) -> tuple[Manifest, DiskRecord]:
        """``latest``, ``ID``, ``ID-PREFIX``, each optionally ``:DISK`` (``latest:DISK``: the
        newest snapshot that holds DISK)."""
        snap, _, disk = spec.partition(":")
        if snap in ("", "latest") and disk:
            # the newest snapshot *of that disk*: snapshots of other disks may be newer
            found = catalog.latest_with_disk(self.backend, self.keys, disk)
            if found is None:
                raise NotFound(f"no snapshot in the repository has a disk {disk!r}")
            return found, found.disk(disk)
        manifest = self.manifest(catalog.resolve(self.backend, snap or "latest"))
        return manifest, manifest.disk(disk or None)

    def forget(self, snapshot_id: str) -> None:
        """Remove a snapshot's manifest (its data stays until gc). Idempotent."""
        self.backend.delete(catalog.PREFIX + snapshot_id)

    def _missing_packs(self, packs: set[str]) -> list[str]:
        """Which of ``packs`` are gone: one HEAD each for a few (on S3 16 at a time), else
        one listing of ``data/`` (a request per 1000 packs on S3, instead of one per pack)."""
        if len(packs) <= 64:
            asked = exists_many(self.backend, [pack_key(p) for p in sorted(packs)])
            return [key.rsplit("/", 1)[1] for key, there in asked if not there]
        present = {key.rsplit("/", 1)[1] for key in self.backend.list("data/")}
        return sorted(packs - present)

    def commit(
        self,
        disks: list[DiskRecord],
        tags: dict[str, str] | None = None,
        packs: set[str] | frozenset[str] = frozenset(),
    ) -> Manifest:
        """Make a snapshot of ``disks`` (whose data is stored and flushed).

        Re-checks that every pack the new snapshot relies on (``packs``, as the target nodes
        report them, and this object's own store's) still exists, then writes the manifest:
        the one atomic step that makes the snapshot exist.
        """
        if not disks:
            raise RepositoryError("a snapshot needs at least one disk")
        names = [d.name for d in disks]
        if len(set(names)) != len(names):
            raise RepositoryError(f"disk names must be unique in a snapshot: {names}")
        relied = set(packs)
        if self._store is not None:
            self._store.flush()
            relied |= self._store.relied | self._store.written
        missing = self._refused_packs(disks, relied)
        if missing:
            raise RepositoryError(
                f"{len(missing)} pack(s) this backup relies on were removed meanwhile "
                f"(e.g. {missing[0]}); nothing was committed: run the backup again"
            )
        snapshot_id, time = catalog.new_id()
        manifest = Manifest(snapshot_id, time, socket.gethostname(), disks, tags or {})
        catalog.write(self.backend, self.keys, manifest)
        return manifest
