"""Byte-addressed bitmap over a disk, one bit per granule.

Dirty bitmaps, block-copy's to-copy bitmap and copy-before-write's access/done bitmaps all
need the same primitive: "which granules of this byte range are marked", with fast range
updates and fast next-set/next-clear searches.  This module provides it and nothing else: no
I/O, no asyncio, no naming, enabling or successor logic (that belongs to the dirty-bitmap
layer built on top).

Storage is a little-endian ``bitarray`` of exactly ``nbits`` bits, so memory is one bit per
granule (8 MiB for a 4 TiB disk at 64 KiB granularity) and every search or range operation
runs in C.  ``bitarray`` was chosen over ``pyroaring`` by ``benchmarks/bitmap_libs.py``: it is
5-7x faster at walking dirty runs, which is what the copy loop and block-status do; see
``docs/performance-bitmap.md``.  The number of set bits is kept up to date on every update,
so ``count()`` and ``dirty_bytes()`` are O(1).

Addressing rules (all offsets and lengths are in bytes):

* granule ``i`` covers ``[i * granularity, min((i + 1) * granularity, size))``; the last
  granule may be partial;
* marking (``set``) rounds outward: every granule the range touches is set;
* clearing (``reset``) must be granule-aligned (the end may also be at or past ``size``), so
  no dirty byte is ever forgotten by accident;
* searches return granule-aligned offsets; lengths are clipped to ``size``.

Not thread-safe: like the rest of the daemon it is owned by one event loop.
"""

from __future__ import annotations

from collections.abc import Iterator

from bitarray import bitarray
from bitarray.util import zeros

__all__ = ["Bitmap"]

_MIN_GRANULARITY = 512


class Bitmap:
    """A fixed-size bitmap over ``size`` bytes with ``granularity`` bytes per bit.

    :param size: number of bytes covered (>= 0).
    :param granularity: bytes per bit, a power of two >= 512.
    :raise ValueError: on a negative size or an invalid granularity.
    """

    __slots__ = ("_bits", "_count", "_granularity", "_nbits", "_shift", "_size")

    def __init__(self, size: int, granularity: int) -> None:
        if size < 0:
            raise ValueError(f"bitmap size must be >= 0, got {size}")
        if granularity < _MIN_GRANULARITY or granularity & (granularity - 1):
            raise ValueError(
                f"granularity must be a power of two >= {_MIN_GRANULARITY}, got {granularity}"
            )
        self._size = size
        self._granularity = granularity
        self._shift = granularity.bit_length() - 1
        self._nbits = -(-size // granularity)
        self._bits: bitarray = zeros(self._nbits, endian="little")
        self._count = 0

    # -- properties ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of bytes covered."""
        return self._size

    @property
    def granularity(self) -> int:
        """Bytes per bit."""
        return self._granularity

    @property
    def nbits(self) -> int:
        """Number of granules, ``ceil(size / granularity)``."""
        return self._nbits

    # -- helpers ---------------------------------------------------------------------------

    def _first_bit(self, offset: int) -> int:
        """Index of the granule containing ``offset``."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        return offset >> self._shift

    def _end_bit(self, end: int | None) -> int:
        """One past the last granule whose start is below ``end`` (clipped to size)."""
        if end is None or end >= self._size:
            return self._nbits
        return -(-end >> self._shift) if end > 0 else 0

    def _bit_range_end(self, bit: int) -> int:
        """Byte offset where granule ``bit - 1`` ends, clipped to size."""
        return min(bit << self._shift, self._size)

    def _set_bits(self, start: int, stop: int) -> None:
        if start < stop:
            self._count += (stop - start) - self._bits.count(1, start, stop)
            self._bits[start:stop] = 1

    def _reset_bits(self, start: int, stop: int) -> None:
        if start < stop:
            self._count -= self._bits.count(1, start, stop)
            self._bits[start:stop] = 0

    def _check_compatible(self, other: Bitmap) -> None:
        if other._size != self._size:
            raise ValueError(f"bitmap sizes differ: {self._size} != {other._size}")

    # -- updates ---------------------------------------------------------------------------

    def set(self, offset: int, length: int) -> None:
        """Mark every granule touched by ``[offset, offset + length)``, clipped to size.

        :raise ValueError: if ``offset`` or ``length`` is negative.
        """
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        start = self._first_bit(offset)
        if length == 0 or offset >= self._size:
            return
        self._set_bits(start, self._end_bit(offset + length))

    def reset(self, offset: int, length: int) -> None:
        """Clear the granules of ``[offset, offset + length)``, clipped to size.

        :raise ValueError: if ``offset`` is not aligned to the granularity, or the end is
            neither aligned nor at/after ``size``, or either value is negative.
        """
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        start = self._first_bit(offset)
        end = offset + length
        mask = self._granularity - 1
        if offset & mask:
            raise ValueError(f"reset offset {offset} not aligned to {self._granularity}")
        if end & mask and end < self._size:
            raise ValueError(f"reset end {end} neither aligned to {self._granularity} nor >= size")
        self._reset_bits(start, self._end_bit(end))

    def fill(self) -> None:
        """Set every granule."""
        self._bits.setall(1)
        self._count = self._nbits

    def clear(self) -> None:
        """Clear every granule."""
        self._bits.setall(0)
        self._count = 0

    def merge(self, other: Bitmap) -> None:
        """OR ``other`` into this bitmap.

        ``other`` may use a different granularity: each of its runs is set here, rounding
        outward, so every byte dirty in ``other`` is dirty here afterwards.

        :raise ValueError: if the sizes differ.
        """
        self._check_compatible(other)
        if other._granularity == self._granularity:
            self._bits |= other._bits
            self._count = self._bits.count(1)
        else:
            for start, length in other.runs():
                self.set(start, length)

    def subtract(self, other: Bitmap) -> None:
        """Clear here what is set in ``other`` (AND NOT).

        With a different granularity, ``other``'s runs are rounded *inward*: a granule is
        cleared only if ``other`` covers all of its bytes, so no dirty byte is lost.

        :raise ValueError: if the sizes differ.
        """
        self._check_compatible(other)
        if other._granularity == self._granularity:
            self._bits &= ~other._bits
            self._count = self._bits.count(1)
            return
        mask = self._granularity - 1
        for start, length in other.runs():
            end = start + length
            first = (start + mask) >> self._shift
            last = self._nbits if end >= self._size else end >> self._shift
            self._reset_bits(first, last)

    # -- queries ---------------------------------------------------------------------------

    def get(self, offset: int) -> bool:
        """Whether the granule containing ``offset`` is set.

        :raise ValueError: unless ``0 <= offset < size``.
        """
        if not 0 <= offset < self._size:
            raise ValueError(f"offset {offset} outside bitmap of size {self._size}")
        return bool(self._bits[offset >> self._shift])

    def count(self) -> int:
        """Number of set granules (O(1))."""
        return self._count

    def dirty_bytes(self) -> int:
        """Bytes covered by set granules, the partial last granule counted to ``size``."""
        total = self._count << self._shift
        if self._count and self._bits[-1]:
            total -= (self._nbits << self._shift) - self._size
        return total

    def is_empty(self) -> bool:
        """Whether no granule is set."""
        return self._count == 0

    def _find(self, value: int, offset: int, end: int | None) -> int | None:
        start = self._first_bit(offset)
        if offset >= (self._size if end is None else min(end, self._size)):
            return None
        i = self._bits.find(value, start, self._end_bit(end))
        return None if i < 0 else i << self._shift

    def next_set(self, offset: int, end: int | None = None) -> int | None:
        """Start of the first set granule at or after the one containing ``offset``.

        Only granules starting below ``end`` (default: ``size``) are searched.

        :return: a granule-aligned byte offset, or None if there is none.
        """
        return self._find(1, offset, end)

    def next_clear(self, offset: int, end: int | None = None) -> int | None:
        """Like :meth:`next_set`, for clear granules."""
        return self._find(0, offset, end)

    def next_dirty_area(self, offset: int, end: int, max_length: int) -> tuple[int, int] | None:
        """First run of set granules at or after the granule containing ``offset``.

        The run only includes granules starting below ``end``.

        :param max_length: cap on the returned length; rounded down to the granularity but
            never below one granule.
        :return: ``(start, length)`` with ``start`` granule-aligned and the length clipped to
            ``max_length`` and to ``size``, or None if nothing is set.
        :raise ValueError: if ``max_length`` is not positive.
        """
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {max_length}")
        start = self._find(1, offset, end)
        if start is None:
            return None
        first = start >> self._shift
        cap = max(1, max_length >> self._shift)
        stop = min(self._end_bit(end), first + cap)
        clear = self._bits.find(0, first, stop)
        last = stop if clear < 0 else clear
        return start, self._bit_range_end(last) - start

    def runs(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield every run of set granules as ``(start, length)``.

        Searches like :meth:`next_set`; lengths are clipped to ``size``.  The bitmap must not
        be modified while the iterator is in use.
        """
        i = self._first_bit(offset)
        if offset >= (self._size if end is None else min(end, self._size)):
            return
        stop = self._end_bit(end)
        bits = self._bits
        while i < stop:
            first = bits.find(1, i, stop)
            if first < 0:
                return
            last = bits.find(0, first, stop)
            if last < 0:
                last = stop
            start = first << self._shift
            yield start, self._bit_range_end(last) - start
            i = last

    # -- copying, comparison, serialisation -------------------------------------------------

    def copy(self) -> Bitmap:
        """An independent copy."""
        new = Bitmap.__new__(Bitmap)
        new._size = self._size
        new._granularity = self._granularity
        new._shift = self._shift
        new._nbits = self._nbits
        new._bits = self._bits.copy()
        new._count = self._count
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return (
            self._size == other._size
            and self._granularity == other._granularity
            and self._count == other._count
            and self._bits == other._bits
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"Bitmap(size={self._size}, granularity={self._granularity}, "
            f"count={self._count}/{self._nbits})"
        )

    def to_bytes(self) -> bytes:
        """Serialise: bit ``i`` is bit ``i % 8`` of byte ``i // 8``; ``ceil(nbits / 8)`` bytes.

        Padding bits in the last byte are zero.
        """
        return self._bits.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, size: int, granularity: int) -> Bitmap:
        """Inverse of :meth:`to_bytes`.

        Padding bits past ``nbits`` in the last byte are ignored: qcow2 stores an all-ones
        bitmap cluster as a flag, which expands to set padding bits.

        :raise ValueError: if ``data`` is not exactly ``ceil(nbits / 8)`` bytes long.
        """
        bm = cls(size, granularity)
        expected = (bm._nbits + 7) // 8
        if len(data) != expected:
            raise ValueError(
                f"bitmap data is {len(data)} bytes, expected {expected} for {bm._nbits} bits"
            )
        bits = bitarray(endian="little")
        bits.frombytes(data)
        del bits[bm._nbits :]
        bm._bits = bits
        bm._count = bits.count(1)
        return bm
