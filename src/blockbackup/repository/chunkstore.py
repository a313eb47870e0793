"""Chunks in packs: the packer that writes them, the table that finds them, the reader.

Why packs: an object store charges per request, so about 16 MiB of blobs go in one PUT
(pack), followed by one small PUT of the pack's header (``index/<pack>``). The write order
pack -> index means an index never names a missing pack; a pack without an index (a writer
killed between the two) is found on load and its header read, so its chunks are reused.

Memory: the known-address table holds one entry per stored blob; the packer holds at most
one pack (about ``pack_size`` bytes) at a time.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from blockbackup.repository import blob
from blockbackup.repository.backend import Backend
from blockbackup.repository.cache import IndexCache
from blockbackup.repository.errors import CorruptData, NotFound, RepositoryError
from blockbackup.repository.keys import Keys

PACK_MAGIC = b"BBPACK1\n"
PACK_END = b"BBPKEND1"
HEADER_MAGIC = b"BBPH"
_ENTRY = struct.Struct("<32sQII")  # address, offset, stored length, plain length
_TRAILER = struct.Struct("<I8s")
HEADER_AAD = b"pack-header"
DEFAULT_PACK_SIZE = 16 << 20


def pack_key(pack: str) -> str:
    return f"data/{pack[:2]}/{pack}"


def index_key(pack: str) -> str:
    return f"index/{pack}"


@dataclass(frozen=True, slots=True)
class Location:
    """Where a blob is: its pack, and its stored bytes' range and plaintext length."""

    pack: str
    offset: int
    length: int
    plain: int


def _encode_header(entries: list[tuple[bytes, int, int, int]]) -> bytes:
    out = bytearray(HEADER_MAGIC + struct.pack("<I", len(entries)))
    for entry in entries:
        out += _ENTRY.pack(*entry)
    return bytes(out)


def _decode_header(data: bytes, what: str) -> list[tuple[bytes, int, int, int]]:
    if data[:4] != HEADER_MAGIC or len(data) < 8:
        raise CorruptData(f"{what}: not a pack header")
    (count,) = struct.unpack_from("<I", data, 4)
    if len(data) != 8 + count * _ENTRY.size:
        raise CorruptData(f"{what}: pack header has the wrong length")
    return [_ENTRY.unpack_from(data, 8 + i * _ENTRY.size) for i in range(count)]


class ChunkStore:
    """Stores blobs by address, deduplicated against everything the repository holds.

    Blocking methods (they call the backend): run them in a thread, one at a time.
    """

    def __init__(self, backend: Backend, keys: Keys, pack_size: int = DEFAULT_PACK_SIZE) -> None:
        self.backend = backend
        self.keys = keys
        self.pack_size = pack_size
        self._table: dict[bytes, Location] = {}
        self._buffer = bytearray(PACK_MAGIC)
        self._pending: dict[bytes, tuple[int, int, int]] = {}  # address -> offset, len, plain
        #: Packs written by this process, and packs holding blobs it reused (checked at commit).
        self.written: set[str] = set()
        self.relied: set[str] = set()
        #: Counters: blobs and stored bytes added, blobs found already stored.
        self.stored_blobs = 0
        self.stored_bytes = 0
        self.reused_blobs = 0
        self._cache: IndexCache | None = None

    # -- loading ----------------------------------------------------------------------------

    def load(self, cache: IndexCache | None = None) -> None:
        """Learn every stored blob: the pack indexes, then packs that lack one. With a
        ``cache`` (remote repositories), an index already cached costs no request."""
        self._cache = cache
        indexed: set[str] = set()
        for key in self.backend.list("index/"):
            pack = key.rsplit("/", 1)[1]
            stored = cache.get(pack) if cache is not None else None
            if stored is not None and cache is not None:
                try:
                    self._learn(pack, stored, f"index {pack}")
                    indexed.add(pack)
                    continue
                except CorruptData:
                    cache.forget(pack)  # a damaged copy: fetch it again
            try:
                stored = self.backend.get(key)
            except NotFound:
                continue  # deleted by a concurrent gc between list and get
            self._learn(pack, stored, f"index {pack}")
            indexed.add(pack)
            if cache is not None:
                cache.put(pack, stored)
        if cache is not None:
            cache.keep_only(indexed)
        for key in self.backend.list("data/"):
            pack = key.rsplit("/", 1)[1]
            if pack not in indexed:
                self._recover(pack)

    def _learn(self, pack: str, header_blob: bytes, what: str) -> None:
        header = blob.decode(self.keys, header_blob, HEADER_AAD, what, 1 << 30)
        for address, offset, length, plain in _decode_header(header, what):
            self._table.setdefault(address, Location(pack, offset, length, plain))

    def _recover(self, pack: str) -> None:
        """A pack whose index was never written (its writer was killed): read its header
        from the pack itself and write the missing index."""
        key = pack_key(pack)
        size = self.backend.size(key)
        if size is None or size < len(PACK_MAGIC) + _TRAILER.size:
            return
        length, end = _TRAILER.unpack(self.backend.get(key, size - _TRAILER.size, _TRAILER.size))
        if end != PACK_END or length > size:
            return  # a damaged pack: verify reports it; nothing in it is trusted
        start = size - _TRAILER.size - length
        header_blob = self.backend.get(key, start, length)
        try:
            self._learn(pack, header_blob, f"pack {pack}")
        except CorruptData:
            return
        self.backend.put(index_key(pack), header_blob)
        if self._cache is not None:
            self._cache.put(pack, header_blob)

    # -- writing ----------------------------------------------------------------------------

    def has(self, address: bytes) -> bool:
        return address in self._table or address in self._pending

    def add(self, address: bytes, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` under ``address`` unless it is known; True if it was stored."""
        if self.has(address):
            return self.add_encoded(address, b"", len(data))
        return self.add_encoded(address, blob.encode(self.keys, data, address), len(data))

    def add_encoded(self, address: bytes, stored: bytes, plain: int) -> bool:
        """As :meth:`add`, with the blob already encoded (``blob.encode(keys, data,
        address)``, done in parallel by the caller); ``stored`` may be empty when the
        caller saw the address known. True if it was stored."""
        location = self._table.get(address)
        if location is not None:
            if location.pack not in self.written:
                self.relied.add(location.pack)
            self.reused_blobs += 1
            return False
        if address in self._pending:
            self.reused_blobs += 1
            return False
        if not stored:
            raise RepositoryError(f"chunk {address.hex()} is not known and has no data")
        self._pending[address] = (len(self._buffer), len(stored), plain)
        self._buffer += stored
        self.stored_blobs += 1
        self.stored_bytes += len(stored)
        if len(self._buffer) >= self.pack_size:
            self.flush()
        return True

    def flush(self) -> None:
        """Write the pending pack and then its index (nothing if nothing is pending)."""
        if not self._pending:
            return
        entries = [(a, o, n, p) for a, (o, n, p) in self._pending.items()]
        header_blob = blob.encode(self.keys, _encode_header(entries), HEADER_AAD)
        # A new object, not the buffer grown in place: if a put fails (a full disk), the
        # buffer and the pending entries are as they were (the next flush retries), and no
        # view of the buffer kept alive by the error can stop it from growing again.
        data = b"".join((self._buffer, header_blob, _TRAILER.pack(len(header_blob), PACK_END)))
        pack = hashlib.sha256(data).hexdigest()
        self.backend.put(pack_key(pack), data)
        self.backend.put(index_key(pack), header_blob)
        if self._cache is not None:
            self._cache.put(pack, bytes(header_blob))
        self.written.add(pack)
        for address, offset, length, plain in entries:
            self._table[address] = Location(pack, offset, length, plain)
        self._pending.clear()
        self._buffer = bytearray(PACK_MAGIC)

    # -- reading ----------------------------------------------------------------------------

    def locate(self, address: bytes) -> Location:
        location = self._table.get(address)
        if location is None:
            raise NotFound(f"chunk {address.hex()} is not in the repository")
        return location

    def read(self, address: bytes) -> bytes:
        """The plaintext of a stored blob, checked against its address."""
        if address in self._pending:
            self.flush()  # rare: a read of what this writer just added
        location = self.locate(address)
        what = f"chunk {address.hex()} in pack {location.pack}"
        try:
            stored = self.backend.get(pack_key(location.pack), location.offset, location.length)
        except NotFound:
            raise CorruptData(f"{what}: the pack is missing") from None
        if len(stored) != location.length:
            raise CorruptData(f"{what}: the pack is truncated")
        data = blob.decode(self.keys, stored, address, what, location.plain)
        if len(data) != location.plain or self.keys.address(data) != address:
            raise CorruptData(f"{what}: content does not match its address")
        return data

    def __len__(self) -> int:
        return len(self._table) + len(self._pending)


def check_pack_keyless(backend: Backend, pack: str) -> None:
    """The check a server can run without the key: the pack's bytes hash to its name."""
    data = backend.get(pack_key(pack))
    if hashlib.sha256(data).hexdigest() != pack:
        raise CorruptData(f"pack {pack}: its content does not match its name")


__all__ = ["ChunkStore", "Location", "RepositoryError", "check_pack_keyless"]
