"""Chunks in packs: the packer that writes them, the table that finds them, the reader.

Why packs: an object store charges per request, so about 16 MiB of blobs go in one PUT
(pack), followed by one small PUT of the pack's header (``index/<pack>``). The write order
pack -> index means an index never names a missing pack; a pack without an index (a writer
killed between the two) is found on load and its header read, so its chunks are reused.

Memory: the known-address table holds ~60 bytes per stored blob (``addresstable.py``), at
most 512Ki of them (the rest in its file: ``knowntable.py``); the packer holds two pack
buffers (about ``pack_size`` bytes each): one being filled while the other is hashed,
written and synced by a writer thread.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockbackup.repository import blob, condemned, encoder_worker, packhash
from blockbackup.repository.addresstable import RECORD, Location
from blockbackup.repository.backend import Backend, get_many
from blockbackup.repository.cache import IndexCache
from blockbackup.repository.errors import CorruptData, NotFound, RepositoryError
from blockbackup.repository.keys import Keys
from blockbackup.repository.knowntable import KnownTable
from blockbackup.repository.tablefile import DamagedTable

if TYPE_CHECKING:
    from blockbackup.repository.encoders import EncoderPool, WorkerRun

PACK_MAGIC = b"BBPACK1\n"
PACK_END = b"BBPKEND1"
HEADER_MAGIC = b"BBPH"
_ENTRY = RECORD  # address, offset, stored length, plain length
_TRAILER = struct.Struct("<I8s")
HEADER_AAD = b"pack-header"
DEFAULT_PACK_SIZE = 16 << 20


def pack_key(pack: str) -> str:
    return f"data/{pack[:2]}/{pack}"


def index_key(pack: str) -> str:
    return f"index/{pack}"


@dataclass(frozen=True)
class Counts:
    """What a chunk store stored and reused: its counters at one moment, or the part of
    them one writer added (a store may be shared: ``repository/opened.py``)."""

    stored_blobs: int = 0
    stored_bytes: int = 0
    reused_blobs: int = 0
    stored_index_blobs: int = 0
    stored_index_bytes: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True, slots=True)
class _Stored:
    """A blob's stored bytes as read, and where they are."""

    location: Location
    data: memoryview


def _encode_header(entries: list[tuple[bytes, int, int, int]]) -> bytes:
    out = bytearray(HEADER_MAGIC + struct.pack("<I", len(entries)))
    for entry in entries:
        out += _ENTRY.pack(*entry)
    return bytes(out)


def _header_entries(data: bytes, what: str) -> memoryview:
    """A decoded pack header's entries, checked for shape: ``_ENTRY`` records."""
    if data[:4] != HEADER_MAGIC or len(data) < 8:
        raise CorruptData(f"{what}: not a pack header")
    (count,) = struct.unpack_from("<I", data, 4)
    if len(data) != 8 + count * _ENTRY.size:
        raise CorruptData(f"{what}: pack header has the wrong length")
    return memoryview(data)[8:]


def _decode_header(data: bytes, what: str) -> list[tuple[bytes, int, int, int]]:
    return list(_ENTRY.iter_unpack(_header_entries(data, what)))


#: Packs hashed, written and synced at once by writer threads while the next one fills:
#: one was not enough (the writer was busy 2.8 s of a 3.9 s backup, and the backup waited
#: 1.2 s for it).
PACKS_IN_FLIGHT = 2
#: Room in a pack buffer beyond ``pack_size``: the blob that crosses it and the header.
_HEADROOM = 1 << 20
#: Neighbouring blobs of one pack are read together across gaps up to this size...
READ_GAP = 256 * 1024
#: ...in reads up to this size.
MAX_READ = 8 << 20


def _header_room(entries: int) -> int:
    """The most the header blob of ``entries`` entries and the trailer can take."""
    return 8 + entries * _ENTRY.size + 1 + 12 + 16 + _TRAILER.size


class _Pack:
    """A pack being filled, in a fixed-size buffer (never resized, so it can be reused
    and viewed without copies).

    The buffer is an anonymous mapping, not a ``bytearray``: that zero-fills all of its
    17 MiB at once, and on a VM that hands free memory back to its host each fresh page
    costs about 10 us (54 ms a buffer, measured, three of them per backup), even for a
    pack that only gets a few chunks. A mapping's pages cost only as they are filled.
    """

    def __init__(self, size: int, buffer: mmap.mmap | None = None) -> None:
        self.buffer = buffer if buffer is not None else mmap.mmap(-1, size)
        self.buffer[: len(PACK_MAGIC)] = PACK_MAGIC
        self.end = len(PACK_MAGIC)
        self.entries: dict[bytes, tuple[int, int, int]] = {}  # address -> offset, len, plain

    def fits(self, length: int) -> bool:
        return self.end + length + _header_room(len(self.entries) + 1) <= len(self.buffer)

    def append(self, address: bytes, stored: bytes | bytearray | memoryview, plain: int) -> None:
        end = self.end + len(stored)
        self.buffer[self.end : end] = stored
        self.entries[address] = (self.end, len(stored), plain)
        self.end = end

    def close(self, header_blob: bytes) -> None:
        """Append the header blob and the trailer: the buffer's first ``end`` bytes are
        then the whole pack."""
        tail = header_blob + _TRAILER.pack(len(header_blob), PACK_END)
        self.buffer[self.end : self.end + len(tail)] = tail
        self.end += len(tail)


class _Sealed:
    """A closed pack on its way to the backend."""

    def __init__(self, pack: _Pack, header: bytes, header_blob: bytes, pack_hash: str) -> None:
        self.pack = pack
        #: The header in plaintext (the table learns the pack from it) and as stored.
        self.header = header
        self.header_blob = header_blob
        self.pack_hash = pack_hash
        self.future: Future[str] | None = None


def _written(sealed: _Sealed) -> bool:
    """Whether a sealed pack's write is over and succeeded (waiting for it costs nothing)."""
    future = sealed.future
    return future is not None and future.done() and future.exception() is None


def _write_pack(backend: Backend, sealed: _Sealed) -> str:
    """Name, write and index one pack (in the writer thread; hashing releases the GIL).
    Write order: the pack, then its index."""
    with memoryview(sealed.pack.buffer) as whole, whole[: sealed.pack.end] as data:
        pack = packhash.name_of(data, sealed.pack_hash)
        backend.put(pack_key(pack), data)
    backend.put(index_key(pack), sealed.header_blob)
    return pack


class ChunkStore:
    """Stores blobs by address, deduplicated against everything the repository holds.

    Blocking methods (they call the backend): run them in a thread, one at a time.
    """

    def __init__(
        self,
        backend: Backend,
        keys: Keys,
        pack_size: int = DEFAULT_PACK_SIZE,
        pack_hash: str = packhash.ALGORITHMS[0],
        table_path: Path | None = None,
    ) -> None:
        """``table_path``: where the known-address table may keep what does not fit in
        memory (``knowntable.py``); None keeps it all in memory."""
        self.backend = backend
        self.keys = keys
        self.pack_size = pack_size
        self.pack_hash = pack_hash
        self._table = KnownTable(table_path)
        #: The pack being filled, the one being written (by the writer thread), and a
        #: buffer to reuse: fresh 16 MiB buffers cost their page faults every pack.
        self._buffer_size = len(PACK_MAGIC) + pack_size + _HEADROOM
        self._current = _Pack(self._buffer_size)
        self._sealed: deque[_Sealed] = deque()
        self._spare: list[mmap.mmap] = []
        self._writer: ThreadPoolExecutor | None = None
        #: Packs written by this process, and packs holding blobs it reused (checked at commit).
        self.written: set[str] = set()
        self.relied: set[str] = set()
        #: Counters: blobs and stored bytes added, blobs found already stored; of the blobs
        #: stored, those that are disk index segments, not data (``add(..., index=True)``).
        self.stored_blobs = 0
        self.stored_bytes = 0
        self.reused_blobs = 0
        self.stored_index_blobs = 0
        self.stored_index_bytes = 0
        self._cache: IndexCache | None = None
        #: Packs gc condemned (index deleted) that still exist at load, and what they
        #: hold, learnt on a reader's first miss: never deduplicated against, only read.
        self._condemned_packs: list[str] = []
        self._condemned_table: dict[bytes, Location] | None = None
        self._condemned_lock = threading.Lock()

    @property
    def table(self) -> KnownTable:
        """Where every blob the repository held at load (or this store wrote) is: for
        reading, not changing."""
        return self._table

    def tally(self) -> Counts:
        """The counters now."""
        return Counts(
            self.stored_blobs,
            self.stored_bytes,
            self.reused_blobs,
            self.stored_index_blobs,
            self.stored_index_bytes,
        )

    # -- loading ----------------------------------------------------------------------------

    def load(self, cache: IndexCache | None = None) -> None:
        """Learn every stored blob: the pack indexes (but those the table's file already
        holds), then packs that lack one. With a ``cache`` (remote repositories), an index
        already cached costs no request."""
        self._cache = cache
        listed = [key.rsplit("/", 1)[1] for key in self.backend.list("index/")]
        indexed = self._table.adopt(listed)  # what the table's file holds needs no reading
        fetch = []
        for pack in listed:
            if pack in indexed:
                continue
            stored = cache.get(pack) if cache is not None else None
            if stored is not None and cache is not None:
                try:
                    self._learn(pack, stored, f"index {pack}")
                    indexed.add(pack)
                    continue
                except DamagedTable:
                    raise
                except CorruptData:
                    cache.forget(pack)  # a damaged copy: fetch it again
            fetch.append(pack)
        # One GET per index, several at a time (a host without the cache: a new machine).
        for key, fetched in get_many(self.backend, [index_key(pack) for pack in fetch]):
            pack = key.rsplit("/", 1)[1]
            if fetched is None:
                continue  # deleted by a concurrent gc between list and get
            self._learn(pack, fetched, f"index {pack}")
            indexed.add(pack)
            if cache is not None:
                cache.put(pack, fetched)
        if cache is not None:
            cache.keep_only(indexed)
        for key in self.backend.list("data/"):
            pack = key.rsplit("/", 1)[1]
            if pack in indexed:
                continue
            if self._condemned(pack):
                self._condemned_packs.append(pack)
            else:
                self._recover(pack)

    def _condemned(self, pack: str) -> bool:
        """gc condemned this pack (and deleted its index): its recovery would resurrect
        it. Asked after the index listing, so a marker put before gc deleted the index is
        seen (docs/repository.md, "Concurrency without locks")."""
        return self.backend.exists(condemned.marker_key(pack))

    def _learn(self, pack: str, header_blob: bytes, what: str) -> None:
        header = blob.decode(self.keys, header_blob, HEADER_AAD, what, 1 << 30)
        with _header_entries(header, what) as entries:
            self._table.learn(pack, entries)

    def _recover(self, pack: str) -> None:
        """A pack whose index was never written (its writer was killed): read its header
        from the pack itself and write the missing index."""
        try:
            header_blob = read_pack_header(self.backend, pack)
        except NotFound:
            return  # deleted by a concurrent gc
        if header_blob is None:
            return  # a damaged pack: verify reports it; nothing in it is trusted
        try:
            self._learn(pack, header_blob, f"pack {pack}")
        except DamagedTable:
            raise
        except CorruptData:
            return
        self.backend.put(index_key(pack), header_blob)
        if self._cache is not None:
            self._cache.put(pack, header_blob)

    # -- writing ----------------------------------------------------------------------------

    def has(self, address: bytes) -> bool:
        return (
            address in self._table
            or address in self._current.entries
            or any(address in sealed.pack.entries for sealed in tuple(self._sealed))
        )

    def add(
        self, address: bytes, data: bytes | bytearray | memoryview, index: bool = False
    ) -> bool:
        """Store ``data`` under ``address`` unless it is known; True if it was stored.
        ``index``: the blob is a disk index segment (counted apart from data chunks)."""
        if self.has(address):
            return self.add_encoded(address, b"", len(data), index)
        return self.add_encoded(address, blob.encode(self.keys, data, address), len(data), index)

    def add_encoded(
        self,
        address: bytes,
        stored: bytes | bytearray | memoryview,
        plain: int,
        index: bool = False,
    ) -> bool:
        """As :meth:`add`, with the blob already encoded (``blob.encode(keys, data,
        address)``, done in parallel by the caller); ``stored`` may be empty when the
        caller saw the address known. True if it was stored."""
        pack = self._table.pack_for(address)  # its pack only: no Location made
        if pack is not None:
            if pack not in self.written:
                self.relied.add(pack)
            self.reused_blobs += 1
            return False
        if address in self._current.entries or any(
            address in sealed.pack.entries for sealed in self._sealed
        ):
            self.reused_blobs += 1
            return False
        if not stored:
            raise RepositoryError(f"chunk {address.hex()} is not known and has no data")
        if not self._current.fits(len(stored)):
            self._seal()
            if not self._current.fits(len(stored)):  # larger than a whole buffer
                self._current = _Pack(len(PACK_MAGIC) + _header_room(1) + len(stored))
        self._current.append(address, stored, plain)
        self.stored_blobs += 1
        self.stored_bytes += len(stored)
        if index:
            self.stored_index_blobs += 1
            self.stored_index_bytes += len(stored)
        if self._current.end >= self.pack_size:
            self._seal()
        return True

    def _seal(self) -> None:
        """Hand the filled pack to a writer thread: hashing, writing and syncing it overlap
        with filling the next one. At most ``PACKS_IN_FLIGHT`` packs are being written (the
        oldest is waited for first), so memory stays at that many pack buffers plus one."""
        pack = self._current
        if not pack.entries:
            return
        while self._sealed and _written(self._sealed[0]):
            self._finish_sealed()  # its buffer is free again: no fresh one for the next
        while len(self._sealed) >= PACKS_IN_FLIGHT:
            self._finish_sealed()
        entries = [(a, o, n, p) for a, (o, n, p) in pack.entries.items()]
        header = _encode_header(entries)
        header_blob = bytes(blob.encode(self.keys, header, HEADER_AAD))
        pack.close(header_blob)
        sealed = _Sealed(pack, header, header_blob, self.pack_hash)
        sealed.future = self._executor().submit(_write_pack, self.backend, sealed)
        self._sealed.append(sealed)
        self._current = _Pack(self._buffer_size, self._spare.pop() if self._spare else None)

    def _finish_sealed(self) -> None:
        """Wait for the oldest pack in flight; enter its blobs into the table. A failed
        write (a full disk) is raised and kept: the next flush writes the same pack again."""
        if not self._sealed:
            return
        sealed = self._sealed[0]
        if sealed.future is None:
            sealed.future = self._executor().submit(_write_pack, self.backend, sealed)
        try:
            pack_id = sealed.future.result()
        except BaseException:
            # Every pack that failed meanwhile is written again by the next flush, rather
            # than raising that same error (a disk that was full then) once more.
            for other in self._sealed:
                if other.future is not None and other.future.exception() is not None:
                    other.future = None
            raise
        self.written.add(pack_id)
        if self._cache is not None:
            self._cache.put(pack_id, sealed.header_blob)
        with _header_entries(sealed.header, f"pack {pack_id}") as entries:
            self._table.learn(pack_id, entries)
        self._sealed.popleft()
        if len(sealed.pack.buffer) == self._buffer_size and len(self._spare) < PACKS_IN_FLIGHT:
            self._spare.append(sealed.pack.buffer)

    def _executor(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(PACKS_IN_FLIGHT, thread_name_prefix="bb-pack-writer")
        return self._writer

    def flush(self) -> None:
        """Write the pending pack and then its index; return when every pack added so far
        is durable (nothing to do if nothing is pending)."""
        while self._sealed:
            self._finish_sealed()
        self._seal()
        while self._sealed:
            self._finish_sealed()

    # -- reading ----------------------------------------------------------------------------

    def locate(self, address: bytes) -> Location:
        """Where a stored blob is, for reading it. A blob of a snapshot committed just
        before a gc condemned its pack (gc's mark had not listed it yet) is only in the
        condemned pack until the next sweep puts the pack's index back: a reader finds it
        there (the sweep deletes no pack a listed snapshot uses)."""
        location = self._table.get(address)
        if location is None:
            location = self._condemned_blobs().get(address)
        if location is None:
            raise NotFound(f"chunk {address.hex()} is not in the repository")
        return location

    def _condemned_blobs(self) -> dict[bytes, Location]:
        """What the condemned packs seen at load hold (their headers read once, on the
        first miss; a pack deleted or damaged since is left out)."""
        with self._condemned_lock:
            if self._condemned_table is None:
                table: dict[bytes, Location] = {}
                for pack in self._condemned_packs:
                    try:
                        header_blob = read_pack_header(self.backend, pack)
                        if header_blob is None:
                            continue
                        entries = decode_pack_header(self.keys, header_blob, f"pack {pack}")
                    except (NotFound, CorruptData):
                        continue
                    for address, offset, length, plain in entries:
                        table.setdefault(address, Location(pack, offset, length, plain))
                self._condemned_table = table
            return self._condemned_table

    def read(self, address: bytes) -> bytes:
        """The plaintext of a stored blob, checked against its address."""
        if self.has(address) and address not in self._table:
            self.flush()  # rare: a read of what this writer just added
        location = self.locate(address)
        what = f"chunk {address.hex()} in pack {location.pack}"
        try:
            stored = self.backend.get(pack_key(location.pack), location.offset, location.length)
        except NotFound:
            raise CorruptData(f"{what}: the pack is missing") from None
        return self._check(address, location, stored)

    def _check(self, address: bytes, location: Location, stored: bytes | memoryview) -> bytes:
        """The plaintext of ``stored``, authenticated: by its GCM tag, whose associated
        data is the address (encrypted), or by hashing it again (not encrypted).

        Why not both when encrypted: the tag already proves these are the bytes a key
        holder encrypted for this address, so damage and tampering cannot pass; the hash
        again (HMAC-SHA256, 15% of a restore's CPU) would only catch a writer that hashed
        wrongly, which is what ``verify`` is for (it checks both)."""
        what = f"chunk {address.hex()} in pack {location.pack}"
        if len(stored) != location.length:
            raise CorruptData(f"{what}: the pack is truncated")
        data = blob.decode(self.keys, stored, address, what, location.plain)
        if len(data) != location.plain or (
            not self.keys.encrypted and self.keys.address(data) != address
        ):
            raise CorruptData(f"{what}: content does not match its address")
        return data

    def read_many(self, addresses: list[bytes]) -> dict[bytes, bytes | CorruptData]:
        """The plaintext of each address (or the :class:`CorruptData` that names it), with
        one ranged read per run of neighbouring blobs of a pack instead of one per blob.

        Only reads the table and the backend: safe in parallel threads once nothing is
        pending (a snapshot's reader)."""
        out: dict[bytes, bytes | CorruptData] = {}
        for address, stored in self._read_runs(set(addresses), out):
            try:
                out[address] = self._check(address, stored.location, stored.data)
            except CorruptData as exc:
                out[address] = exc
        return out

    def read_into(
        self,
        out: memoryview,
        places: dict[bytes, list[tuple[int, int]]],
        decoders: EncoderPool | None = None,
    ) -> dict[bytes, CorruptData]:
        """Decode each address's plaintext into ``out`` at each of its places (position,
        length: the chunk's length on the disk); what could not be read, by address (its
        places then hold no trusted bytes). A restore's 1 MiB request is one ranged read
        (one GET on an object store), and an uncompressed chunk is decrypted straight into
        its place (:func:`blob.decode_into`). ``decoders``: worker processes that decode
        the runs, and read them too when the packs are local files
        (:meth:`_decode_in_workers`).

        Trusts the GCM tag as :meth:`_check` does. Safe in parallel threads once nothing
        is pending."""
        if decoders is not None and self._decode_in_workers(out, places, decoders):
            return {}
        failed: dict[bytes, CorruptData] = {}
        for address, stored in self._read_runs(places, failed):
            location = stored.location
            (first, length), *others = places[address]
            what = f"chunk {address.hex()} in pack {location.pack}"
            try:
                if len(stored.data) != location.length:
                    raise CorruptData(f"{what}: the pack is truncated")
                if any(n != location.plain for _at, n in places[address]):
                    raise CorruptData(f"{what}: content does not match its address")
                with out[first : first + length] as target:
                    blob.decode_into(self.keys, stored.data, address, what, target)
                    if not self.keys.encrypted and self.keys.address(target) != address:
                        raise CorruptData(f"{what}: content does not match its address")
                    for at, _n in others:  # the same chunk again in the range
                        out[at : at + length] = target
            except CorruptData as exc:
                failed[address] = exc
        return failed

    def _decode_in_workers(
        self,
        out: memoryview,
        places: dict[bytes, list[tuple[int, int]]],
        decoders: EncoderPool,
    ) -> bool:
        """:meth:`read_into` by a worker process that reads each run of the pack files
        itself (or is given it: S3) and decodes it; False (nothing done that counts) when a
        pack is missing, the request does not fit the worker's memory, the worker failed,
        or a blob did not decode and check: then this thread decodes, naming any damage."""
        if not places:
            return True  # a request inside one chunk, or of zero chunks: nothing to decode
        prepared = self._worker_runs(places)
        if prepared is None:
            return False
        runs, order = prepared
        plain = sum(places[address][0][1] for address in order)
        try:
            with decoders.decoded(runs, plain) as decoded:
                if decoded is None:
                    return False
                pos = 0
                for address in order:
                    for at, length in places[address]:
                        out[at : at + length] = decoded[pos : pos + length]
                    pos += places[address][0][1]
        except RepositoryError:
            return False  # the worker failed (it is replaced): decode here instead
        return True

    def write_in_workers(
        self,
        fd: int,
        offset: int,
        length: int,
        places: dict[bytes, list[tuple[int, int]]],
        grain: int,
        decoders: EncoderPool,
    ) -> list[tuple[int, int]] | None:
        """What :meth:`read_into` would decode into a range of ``length`` bytes (the rest
        of it zeroes), written into the file ``fd`` at ``offset`` by a worker process, but
        for its all-zero ``grain``s: those, as (offset, length) runs in the range. None
        when nothing was written: as for :meth:`_decode_in_workers`, the caller then
        reads the range into a buffer (naming any damage) and writes it. A restore's
        data then goes to the image without this process decoding or writing it. A
        failed write raises ``OSError``."""
        prepared = self._worker_runs(places)
        if prepared is None:
            return None
        runs, order = prepared
        where = bytearray()
        for address in order:
            ats = [at for at, _n in places[address]]
            where += encoder_worker.PLACES.pack(len(ats))
            where += struct.pack(f"<{len(ats)}I", *ats)
        try:
            return decoders.write(runs, bytes(where), len(order), (offset, length, grain), fd)
        except RepositoryError:
            return None  # the worker failed (it is replaced): copy here instead

    def _worker_runs(
        self, places: dict[bytes, list[tuple[int, int]]]
    ) -> tuple[list[WorkerRun], list[bytes]] | None:
        """The runs of ``places`` for a worker: each pack file's path when the packs are
        local files (the worker reads them), else each run's bytes, read here (one ranged
        GET each on S3). With the addresses in their order; None when a pack is missing
        or the places disagree with the repository (the caller names that)."""
        runs: list[WorkerRun] = []
        order: list[bytes] = []
        for run in self._runs(places):
            key = pack_key(run[0][0])
            start = run[0][1]
            end = run[-1][1] + run[-1][3].length
            blobs = bytearray()
            for _pack, offset, address, location in run:
                if any(n != location.plain for _at, n in places[address]):
                    return None  # a disk index that disagrees: named by the caller
                blobs += encoder_worker.BLOB.pack(
                    offset - start, location.length, location.plain, address
                )
                order.append(address)
            path = self.backend.local_path(key)
            if path is not None:
                runs.append((os.fsencode(path), start, end - start, len(run), bytes(blobs)))
                continue
            try:
                data = memoryview(self.backend.get_buffer(key, start, end - start))
            except NotFound:
                return None
            runs.append((data, 0, end - start, len(run), bytes(blobs)))
        return runs, order

    def _runs(self, addresses: Iterable[bytes]) -> Iterator[list[tuple[str, int, bytes, Location]]]:
        """The blobs of ``addresses`` in runs of neighbouring blobs of a pack (gaps up to
        ``READ_GAP``, runs up to ``MAX_READ``): (pack, offset, address, location) each."""
        located: list[tuple[str, int, bytes, Location]] = []
        for address in addresses:
            location = self.locate(address)
            located.append((location.pack, location.offset, address, location))
        located.sort()
        run: list[tuple[str, int, bytes, Location]] = []
        for item in located:
            if run and (
                item[0] != run[0][0]
                or item[1] - (run[-1][1] + run[-1][3].length) > READ_GAP
                or item[1] + item[3].length - run[0][1] > MAX_READ
            ):
                yield run
                run = []
            run.append(item)
        if run:
            yield run

    def _read_runs(
        self, addresses: Iterable[bytes], missing: MutableMapping[bytes, Any]
    ) -> Iterator[tuple[bytes, _Stored]]:
        """(address, stored bytes) of each address, read one run of neighbouring blobs of
        a pack at a time (:meth:`_runs`). A blob whose pack is missing gets its
        :class:`CorruptData` in ``missing`` instead."""
        for run in self._runs(addresses):
            yield from self._read_run(run, missing)

    def _read_run(
        self, run: list[tuple[str, int, bytes, Location]], missing: MutableMapping[bytes, Any]
    ) -> Iterator[tuple[bytes, _Stored]]:
        pack, start = run[0][0], run[0][1]
        end = run[-1][1] + run[-1][3].length
        try:
            data = memoryview(self.backend.get_buffer(pack_key(pack), start, end - start))
        except NotFound:
            for _p, _o, address, _l in run:
                missing[address] = CorruptData(
                    f"chunk {address.hex()} in pack {pack}: the pack is missing"
                )
            return
        for _p, offset, address, location in run:
            yield (
                address,
                _Stored(location, data[offset - start : offset - start + location.length]),
            )

    def records_of(self, pack: str) -> Iterator[int]:
        """The table's records of ``pack`` (numbers as :meth:`KnownTable.record` gives).
        Those in the table's file are found by the addresses the pack's index lists (from
        the cache, else one request; the pack's own header if the index is gone; the whole
        file read if neither can be)."""
        table = self._table
        yield from table.memory_records_of(pack)
        if not table.holds_in_file(pack):
            return
        entries = self._header_entries_of(pack)
        if entries is None:
            yield from table.file_records_of(pack)
            return
        for address, _offset, _length, _plain in entries:
            record = table.record(address)
            if 0 <= record < table.in_file and table.pack_of(record) == pack:
                yield record

    def _header_entries_of(self, pack: str) -> list[tuple[bytes, int, int, int]] | None:
        what = f"index {pack}"
        stored = self._cache.get(pack) if self._cache is not None else None
        try:
            if stored is None:
                try:
                    stored = self.backend.get(index_key(pack))
                except NotFound:
                    stored = read_pack_header(self.backend, pack)
            return None if stored is None else decode_pack_header(self.keys, stored, what)
        except (NotFound, CorruptData):
            return None

    def close(self) -> None:
        """Close the table's file (the store is not used after it)."""
        self._table.close()

    def __len__(self) -> int:
        sealed = sum(len(s.pack.entries) for s in self._sealed)
        return len(self._table) + len(self._current.entries) + sealed


def read_pack_header(backend: Backend, pack: str) -> bytes | None:
    """The header blob stored at the end of a pack (None if the pack is damaged or too
    short); ``NotFound`` if the pack is absent."""
    key = pack_key(pack)
    size = backend.size(key)
    if size is None:
        raise NotFound(f"pack {pack} is missing")
    if size < len(PACK_MAGIC) + _TRAILER.size:
        return None
    length, end = _TRAILER.unpack(backend.get(key, size - _TRAILER.size, _TRAILER.size))
    if end != PACK_END or length > size - _TRAILER.size - len(PACK_MAGIC):
        return None
    header_blob = backend.get(key, size - _TRAILER.size - length, length)
    return header_blob if len(header_blob) == length else None


def decode_pack_header(
    keys: Keys, header_blob: bytes, what: str
) -> list[tuple[bytes, int, int, int]]:
    """(address, offset, stored length, plain length) of each blob a header blob lists."""
    return _decode_header(blob.decode(keys, header_blob, HEADER_AAD, what, 1 << 30), what)


def check_pack_keyless(backend: Backend, pack: str, pack_hash: str) -> None:
    """The check a server can run without the key: the pack's bytes hash to its name
    (``pack_hash``: the config's, which is plain JSON)."""
    data = backend.get_buffer(pack_key(pack))
    if packhash.name_of(data, pack_hash) != pack:
        raise CorruptData(f"pack {pack}: its content does not match its name")


__all__ = ["ChunkStore", "Location", "RepositoryError", "check_pack_keyless"]
