"""gc's mark set: the 64-bit prefixes of every address a snapshot uses, compactly.

Why prefixes in sorted arrays: gc must not hold a per-chunk Python object (64M chunks at
4 TiB). Eight bytes per used blob (1M chunks: 8 MiB), kept sorted in 256 buckets by the
first address byte, answer "is this blob used?" by bisection. Two addresses sharing a
prefix only keep a dead blob alive, which is safe. New prefixes gather in per-bucket
pending arrays (duplicates included) and are merged into the bucket once the pending part
outgrows it, so the temporary set of a merge stays the size of one bucket.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left

_BUCKETS = 256
_MIN_PENDING = 4096


class MarkSet:
    def __init__(self) -> None:
        self._sorted = [array("Q") for _ in range(_BUCKETS)]
        self._pending = [array("Q") for _ in range(_BUCKETS)]

    def add_addresses(self, data: bytes | bytearray | memoryview) -> None:
        """Mark each 32-byte address in ``data`` (a disk index segment's raw entries)."""
        words = array("Q")
        words.frombytes(bytes(data))
        pending = self._pending
        for value in words[::4]:
            pending[value & 0xFF].append(value)
        for bucket in range(_BUCKETS):
            if len(pending[bucket]) > max(_MIN_PENDING, len(self._sorted[bucket])):
                self._merge(bucket)

    def add(self, address: bytes) -> None:
        self.add_addresses(address[:32])

    def _merge(self, bucket: int) -> None:
        merged = set(self._sorted[bucket])
        merged.update(self._pending[bucket])
        self._sorted[bucket] = array("Q", sorted(merged))
        self._pending[bucket] = array("Q")

    def finish(self) -> None:
        """Merge everything pending; call before asking (and again after more adds)."""
        for bucket in range(_BUCKETS):
            if self._pending[bucket]:
                self._merge(bucket)

    def __contains__(self, address: object) -> bool:
        assert isinstance(address, bytes)
        value = int.from_bytes(address[:8], sys.byteorder)
        values = self._sorted[value & 0xFF]
        i = bisect_left(values, value)
        return i < len(values) and values[i] == value

    def __len__(self) -> int:
        return sum(len(b) for b in self._sorted)

    def nbytes(self) -> int:
        return sum(b.itemsize * len(b) for b in (*self._sorted, *self._pending))
