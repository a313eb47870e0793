"""A disk's index: the address of every 64 KiB chunk, by offset, in 1 GiB segments.

Why complete and segmented: every snapshot's index names every chunk, so a restore never
walks a chain of incrementals; segments are content-addressed blobs, so an unchanged GiB of
disk keeps its segment address and costs nothing in the next snapshot. A segment that is all
zero chunks has the zero address and is not stored at all.
"""

from __future__ import annotations

from collections.abc import Iterator

from blockbackup.repository.chunkstore import ChunkStore
from blockbackup.repository.errors import CorruptData
from blockbackup.repository.keys import ZERO_ADDRESS

SEGMENT_ENTRIES = 16384
ADDRESS_SIZE = 32
#: Clean (unchanged) segments kept in memory for reading.
CACHED_SEGMENTS = 8
#: Changed segments kept in memory (16 MiB); beyond them the oldest is stored at once, as
#: :meth:`DiskIndex.save` would. Without a bound a backup held every changed segment until
#: its end: 32 bytes per chunk, 512 MiB for a first backup of a 1 TiB disk, or for an
#: incremental whose scattered writes touch every GiB of it. A segment stored early and
#: changed again is stored again; the first copy is garbage for gc.
DIRTY_SEGMENTS = 32


class DiskIndex:
    """Chunk addresses of one disk, loaded a segment at a time from a chunk store."""

    def __init__(
        self, store: ChunkStore, size: int, chunk_size: int, segments: list[bytes] | None = None
    ) -> None:
        self.store = store
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = -(-size // chunk_size)
        count = -(-self.chunks // SEGMENT_ENTRIES)
        if segments is None:
            segments = [ZERO_ADDRESS] * count
        if len(segments) != count:
            raise CorruptData(
                f"disk index has {len(segments)} segments for {size} bytes (expected {count})"
            )
        self.segments = list(segments)
        self._loaded: dict[int, bytearray] = {}
        self._dirty: set[int] = set()

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def _entries_in(self, segment: int) -> int:
        return min(SEGMENT_ENTRIES, self.chunks - segment * SEGMENT_ENTRIES)

    def _segment(self, segment: int) -> bytearray:
        loaded = self._loaded.get(segment)
        if loaded is not None:
            return loaded
        expected = self._entries_in(segment) * ADDRESS_SIZE
        address = self.segments[segment]
        if address == ZERO_ADDRESS:
            data = bytearray(expected)
        else:
            data = bytearray(self.store.read(address))
            if len(data) != expected:
                raise CorruptData(f"disk index segment {address.hex()} has the wrong length")
        clean = [s for s in self._loaded if s not in self._dirty]
        for old in clean[: max(0, len(clean) - CACHED_SEGMENTS + 1)]:
            del self._loaded[old]
        dirty = [s for s in self._loaded if s in self._dirty]
        for old in dirty[: max(0, len(dirty) - DIRTY_SEGMENTS + 1)]:
            self._store_segment(old)
            del self._loaded[old]
        self._loaded[segment] = data
        return data

    def segment_bytes(self, segment: int) -> bytes:
        """The raw addresses of one segment (a commit's re-check walks them)."""
        return bytes(self._segment(segment))

    def loaded_segment(self, index: int) -> tuple[int, int] | None:
        """(first, end) chunk numbers of the segment holding chunk ``index`` if looking
        them up reads nothing (it is in memory, or all zero), else None."""
        segment = index // SEGMENT_ENTRIES
        if segment not in self._loaded and self.segments[segment] != ZERO_ADDRESS:
            return None
        first = segment * SEGMENT_ENTRIES
        return first, first + self._entries_in(segment)

    def get(self, index: int) -> bytes:
        segment, entry = divmod(index, SEGMENT_ENTRIES)
        start = entry * ADDRESS_SIZE
        return bytes(self._segment(segment)[start : start + ADDRESS_SIZE])

    def addresses(self, skip: set[bytes] | None = None) -> Iterator[bytes]:
        """The address of every stored chunk the disk uses, a segment at a time (zero
        chunks and zero segments have none; a chunk used twice comes twice): what a
        verify must check, without holding them all. ``skip``: stored segments whose
        chunks were walked already (another snapshot's); each one walked here is added."""
        for segment, address in enumerate(self.segments):
            dirty = segment in self._dirty
            if (address == ZERO_ADDRESS or (skip is not None and address in skip)) and not dirty:
                continue
            raw = bytes(self._segment(segment))
            for at in range(0, len(raw), ADDRESS_SIZE):
                if raw[at] or raw[at : at + ADDRESS_SIZE] != ZERO_ADDRESS:
                    yield raw[at : at + ADDRESS_SIZE]
            if skip is not None and not dirty:
                skip.add(address)

    def set(self, index: int, address: bytes) -> None:
        segment, entry = divmod(index, SEGMENT_ENTRIES)
        start = entry * ADDRESS_SIZE
        data = self._segment(segment)
        if data[start : start + ADDRESS_SIZE] != address:
            data[start : start + ADDRESS_SIZE] = address
            self._dirty.add(segment)

    def save(self) -> list[bytes]:
        """Store the changed segments (into the chunk store's pending pack) and return the
        segment addresses; the caller flushes the store to make them durable."""
        for segment in sorted(self._dirty):
            self._store_segment(segment)
        return list(self.segments)

    def _store_segment(self, segment: int) -> None:
        """Store a changed segment (into the chunk store's pending pack): clean again."""
        data = bytes(self._loaded[segment])
        if data.count(0) == len(data):
            self.segments[segment] = ZERO_ADDRESS
        else:
            address = self.store.keys.address(data)
            self.store.add(address, data, index=True)
            self.segments[segment] = address
        self._dirty.discard(segment)
