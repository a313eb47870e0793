"""Tests for ``blockbackup.block.bitmap``: edge cases, then a stateful model comparison.

The model is a plain ``set[int]`` of granule indexes; every query of ``Bitmap`` is
recomputed from it by brute force.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from blockbackup.block.bitmap import Bitmap

KiB = 1024
MiB = 1024 * KiB
TiB = 1024 * 1024 * MiB

# -- unit tests ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "granularity"), [(-1, 512), (4096, 256), (4096, 3000)])
def test_constructor_rejects_bad_arguments(size: int, granularity: int) -> None:
    with pytest.raises(ValueError, match=r"size|granularity"):
        Bitmap(size, granularity)


def test_properties_and_partial_last_granule() -> None:
    bm = Bitmap(10 * 512 + 100, 512)
    assert (bm.size, bm.granularity, bm.nbits) == (5220, 512, 11)
    assert bm.is_empty()
    bm.set(5219, 1)  # last byte lives in the partial 11th granule
    assert bm.get(5120)
    assert bm.count() == 1
    assert bm.dirty_bytes() == 100
    assert list(bm.runs()) == [(5120, 100)]
    assert bm.next_dirty_area(0, bm.size, 1 * MiB) == (5120, 100)
    bm.fill()
    assert bm.count() == 11
    assert bm.dirty_bytes() == bm.size


def test_empty_bitmap() -> None:
    bm = Bitmap(0, 512)
    assert bm.nbits == 0
    bm.set(0, 100)
    bm.fill()
    assert bm.count() == 0
    assert bm.dirty_bytes() == 0
    assert bm.next_set(0) is None
    assert bm.next_clear(0) is None
    assert list(bm.runs()) == []
    assert bm.to_bytes() == b""
    assert Bitmap.from_bytes(b"", 0, 512) == bm


def test_set_rounds_outward_and_clips() -> None:
    bm = Bitmap(8 * 4096, 4096)
    bm.set(4095, 2)  # touches granules 0 and 1
    assert list(bm.runs()) == [(0, 8192)]
    bm.clear()
    bm.set(6 * 4096 + 1, 10 * 4096)  # clipped at size
    assert list(bm.runs()) == [(6 * 4096, 2 * 4096)]
    bm.set(bm.size, 4096)  # entirely past the end: no-op
    bm.set(100, 0)  # empty: no-op
    assert bm.count() == 2


def test_set_and_reset_reject_negative() -> None:
    bm = Bitmap(4096, 512)
    with pytest.raises(ValueError, match="length"):
        bm.set(0, -1)
    with pytest.raises(ValueError, match="offset"):
        bm.set(-512, 512)
    with pytest.raises(ValueError, match="length"):
        bm.reset(0, -512)


def test_reset_alignment() -> None:
    bm = Bitmap(10 * 512 + 100, 512)
    bm.fill()
    with pytest.raises(ValueError, match="offset"):
        bm.reset(1, 511)
    with pytest.raises(ValueError, match="end"):
        bm.reset(0, 513)
    with pytest.raises(ValueError, match="end"):
        bm.reset(0, 5119)  # unaligned and below size
    assert bm.count() == 11  # failed resets changed nothing
    bm.reset(1024, 1024)
    assert not bm.get(1024)
    assert not bm.get(2047)
    assert bm.get(2048)
    bm.reset(4608, 700)  # unaligned end past size: clears through the last granule
    assert list(bm.runs()) == [(0, 1024), (2048, 4608 - 2048)]
    bm.reset(5120, 100)  # unaligned end exactly at size
    bm.reset(0, 0)
    assert bm.count() == 7


def test_get_bounds() -> None:
    bm = Bitmap(1000, 512)
    with pytest.raises(ValueError, match="outside"):
        bm.get(1000)
    with pytest.raises(ValueError, match="outside"):
        bm.get(-1)
    assert not bm.get(999)


def test_next_set_and_clear_at_boundaries() -> None:
    bm = Bitmap(8 * 1024 + 10, 1024)  # 9 granules, the last one 10 bytes long
    bm.set(2 * 1024, 1)
    bm.set(8 * 1024, 1)
    # A set granule containing offset is returned aligned down.
    assert bm.next_set(2 * 1024 + 500) == 2 * 1024
    assert bm.next_set(3 * 1024) == 8 * 1024
    assert bm.next_set(3 * 1024, 8 * 1024) is None  # granule 8 starts at end
    assert bm.next_set(3 * 1024, 8 * 1024 + 1) == 8 * 1024
    assert bm.next_set(8 * 1024 + 9) == 8 * 1024
    assert bm.next_set(bm.size) is None
    assert bm.next_set(0, 0) is None
    assert bm.next_set(500, 500) is None
    assert bm.next_set(0, 10 * MiB) == 2 * 1024  # end past size is clipped
    assert bm.next_clear(2 * 1024) == 3 * 1024
    assert bm.next_clear(8 * 1024) is None
    assert bm.next_clear(0) == 0
    bm.fill()
    assert bm.next_clear(0) is None
    with pytest.raises(ValueError, match="offset"):
        bm.next_set(-1)


def test_next_dirty_area() -> None:
    bm = Bitmap(100 * 512 + 1, 512)
    bm.set(10 * 512, 20 * 512)
    assert bm.next_dirty_area(0, bm.size, 1 * MiB) == (10 * 512, 20 * 512)
    assert bm.next_dirty_area(0, bm.size, 4 * 512) == (10 * 512, 4 * 512)
    assert bm.next_dirty_area(0, bm.size, 4 * 512 + 511) == (10 * 512, 4 * 512)
    assert bm.next_dirty_area(0, bm.size, 1) == (10 * 512, 512)  # at least one granule
    assert bm.next_dirty_area(15 * 512 + 7, bm.size, 1 * MiB) == (15 * 512, 15 * 512)
    assert bm.next_dirty_area(0, 12 * 512, 1 * MiB) == (10 * 512, 2 * 512)
    assert bm.next_dirty_area(0, 12 * 512 + 1, 1 * MiB) == (10 * 512, 3 * 512)
    assert bm.next_dirty_area(30 * 512, bm.size, 1 * MiB) is None
    assert bm.next_dirty_area(0, 10 * 512, 1 * MiB) is None
    bm.set(bm.size - 1, 1)
    assert bm.next_dirty_area(30 * 512, bm.size, 1 * MiB) == (100 * 512, 1)
    with pytest.raises(ValueError, match="max_length"):
        bm.next_dirty_area(0, bm.size, 0)


def test_runs_with_range() -> None:
    bm = Bitmap(64 * 512, 512)
    for i in (0, 1, 2, 10, 20, 21, 63):
        bm.set(i * 512, 1)
    assert list(bm.runs()) == [(0, 1536), (5120, 512), (10240, 1024), (32256, 512)]
    assert list(bm.runs(1 * 512 + 3, 21 * 512)) == [(512, 1024), (5120, 512), (10240, 512)]
    assert list(bm.runs(22 * 512, 63 * 512)) == []
    assert list(bm.runs(bm.size)) == []


def test_merge_same_granularity() -> None:
    a, b = Bitmap(10_000, 1024), Bitmap(10_000, 1024)
    a.set(0, 1)
    b.set(9_999, 1)
    a.merge(b)
    assert list(a.runs()) == [(0, 1024), (9 * 1024, 10_000 - 9 * 1024)]
    assert a.count() == 2
    assert list(b.runs()) == [(9 * 1024, 10_000 - 9 * 1024)]  # other untouched


def test_merge_different_granularity_rounds_outward() -> None:
    coarse, fine = Bitmap(16 * 1024 + 100, 4096), Bitmap(16 * 1024 + 100, 512)
    fine.set(4096 + 512, 512)
    fine.set(16 * 1024 + 50, 1)
    coarse.merge(fine)
    assert list(coarse.runs()) == [(4096, 4096), (16 * 1024, 100)]
    fine.clear()
    fine.merge(coarse)
    assert list(fine.runs()) == [(4096, 4096), (16 * 1024, 100)]
    assert fine.count() == 9


def test_subtract() -> None:
    a, b = Bitmap(8 * 512, 512), Bitmap(8 * 512, 512)
    a.fill()
    b.set(512, 1024)
    a.subtract(b)
    assert list(a.runs()) == [(0, 512), (1536, 4096 - 1536)]
    assert a.count() == 6


def test_subtract_different_granularity_rounds_inward() -> None:
    coarse, fine = Bitmap(3 * 4096 + 100, 4096), Bitmap(3 * 4096 + 100, 512)
    coarse.fill()
    fine.set(512, 4096)  # covers [512, 4608): no whole 4 KiB granule
    fine.set(2 * 4096, 4096 + 100)  # covers granules 2 and the partial 3 completely
    coarse.subtract(fine)
    assert list(coarse.runs()) == [(0, 2 * 4096)]
    fine.fill()
    coarse.fill()
    coarse.reset(4096, 4096)
    fine.subtract(coarse)  # coarse -> fine is exact
    assert list(fine.runs()) == [(4096, 4096)]


@pytest.mark.parametrize("op", ["merge", "subtract"])
def test_merge_subtract_reject_size_mismatch(op: str) -> None:
    a, b = Bitmap(4096, 512), Bitmap(4097, 512)
    with pytest.raises(ValueError, match="sizes differ"):
        getattr(a, op)(b)


def test_copy_is_independent_and_equal() -> None:
    a = Bitmap(5000, 512)
    a.set(1000, 2000)
    b = a.copy()
    assert a == b
    b.set(0, 1)
    assert a != b
    assert not a.get(0)
    assert a != Bitmap(5000, 1024)
    assert a != "not a bitmap"


def test_bytes_layout_is_little_endian() -> None:
    bm = Bitmap(10 * 512, 512)
    bm.set(0, 1)
    bm.set(3 * 512, 1)
    bm.set(9 * 512, 1)
    assert bm.to_bytes() == bytes([0b0000_1001, 0b0000_0010])


def test_bytes_round_trip() -> None:
    bm = Bitmap(1 * MiB + 3, 4096)
    for off in (0, 4096 * 7, 4096 * 100, 1 * MiB):
        bm.set(off, 1)
    data = bm.to_bytes()
    assert len(data) == (bm.nbits + 7) // 8
    back = Bitmap.from_bytes(data, bm.size, bm.granularity)
    assert back == bm
    assert back.count() == 4


@pytest.mark.parametrize("data", [b"", b"\x00" * 3, b"\x00" * 5])
def test_from_bytes_rejects_bad_length(data: bytes) -> None:
    with pytest.raises(ValueError, match="expected 4"):
        Bitmap.from_bytes(data, 30 * 512, 512)  # 30 bits -> 4 bytes


def test_from_bytes_ignores_padding_bits() -> None:
    bm = Bitmap.from_bytes(b"\xff" * 4, 30 * 512, 512)  # e.g. a qcow2 all-ones cluster
    assert bm.count() == 30
    assert bm.dirty_bytes() == bm.size
    assert bm.to_bytes() == b"\xff\xff\xff\x3f"
    assert bm == Bitmap.from_bytes(bm.to_bytes(), bm.size, bm.granularity)


def test_repr_and_unhashable() -> None:
    bm = Bitmap(4096, 512)
    assert "granularity=512" in repr(bm)
    with pytest.raises(TypeError):
        hash(bm)


def test_memory_is_one_bit_per_granule() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        bm = Bitmap(4 * TiB, 64 * KiB)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert bm.nbits == 64 * MiB
    assert used <= 8 * MiB + 64 * KiB
    bm.fill()
    assert bm.dirty_bytes() == 4 * TiB


# -- stateful comparison against a set[int] model ----------------------------------------

GRANULARITIES = [512, 1024, 2048, 4096]


def granules_touched(offset: int, length: int, size: int, gran: int) -> range:
    """Granules a ``set(offset, length)`` must mark, computed the slow obvious way."""
    end = min(offset + length, size)
    if length <= 0 or offset >= end:
        return range(0)
    return range(offset // gran, (end - 1) // gran + 1)


def model_runs(model: set[int], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """Runs of consecutive granule indexes of ``model`` within ``[lo, hi)``."""
    i = lo
    while i < hi:
        if i in model:
            j = i
            while j < hi and j in model:
                j += 1
            yield i, j
            i = j
        else:
            i += 1


class BitmapMachine(RuleBasedStateMachine):
    """Drive one ``Bitmap`` and a ``set[int]`` model with the same operations."""

    bm: Bitmap
    model: set[int]

    @initialize(
        gran=st.sampled_from(GRANULARITIES),
        ngran=st.integers(min_value=1, max_value=64),
        tail_frac=st.floats(min_value=0.0, max_value=1.0),
    )
    def init(self, gran: int, ngran: int, tail_frac: float) -> None:
        tail = max(1, round(tail_frac * gran))  # 1..gran bytes in the last granule
        self.gran = gran
        self.size = (ngran - 1) * gran + tail
        self.nbits = ngran
        self.bm = Bitmap(self.size, gran)
        self.model = set()

    # Helpers ------------------------------------------------------------------------------

    def granule_len(self, i: int) -> int:
        return min((i + 1) * self.gran, self.size) - i * self.gran

    def end_bit(self, end: int) -> int:
        end = min(end, self.size)
        return -(-end // self.gran)

    def offsets(self) -> st.SearchStrategy[int]:
        return st.integers(min_value=0, max_value=self.size + self.gran)

    # Rules --------------------------------------------------------------------------------

    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        offset = data.draw(self.offsets(), label="offset")
        length = data.draw(st.integers(0, self.size + self.gran), label="length")
        self.bm.set(offset, length)
        self.model.update(granules_touched(offset, length, self.size, self.gran))

    @rule(data=st.data())
    def reset_aligned(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(0, self.nbits), label="first")
        last = data.draw(st.integers(first, self.nbits), label="last")
        end = last * self.gran
        if last == self.nbits:
            choices = [e for e in (end, self.size, self.size + 7) if e >= first * self.gran]
            end = data.draw(st.sampled_from(choices), label="end")
        self.bm.reset(first * self.gran, end - first * self.gran)
        self.model.difference_update(range(first, last))

    @rule(data=st.data())
    def reset_unaligned_fails(self, data: st.DataObject) -> None:
        granule = data.draw(st.integers(0, self.nbits - 1), label="granule")
        skew = data.draw(st.integers(1, self.gran - 1), label="skew")
        if data.draw(st.booleans(), label="bad start"):
            offset = granule * self.gran + skew
            end = offset + data.draw(st.integers(0, self.size), label="length")
        else:
            offset, end = granule * self.gran, granule * self.gran + skew
            assume(end < self.size)
        before = self.bm.copy()
        with pytest.raises(ValueError, match="aligned"):
            self.bm.reset(offset, end - offset)
        assert self.bm == before

    @rule()
    def fill(self) -> None:
        self.bm.fill()
        self.model = set(range(self.nbits))

    @rule()
    def clear(self) -> None:
        self.bm.clear()
        self.model.clear()

    def random_other(self, data: st.DataObject) -> tuple[Bitmap, set[int]]:
        """Another bitmap of the same size and its model, at the other's granularity."""
        gran = data.draw(st.sampled_from(GRANULARITIES), label="other granularity")
        other = Bitmap(self.size, gran)
        other_model: set[int] = set()
        ranges = data.draw(
            st.lists(st.tuples(self.offsets(), st.integers(0, self.size)), max_size=4),
            label="other ranges",
        )
        for offset, length in ranges:
            other.set(offset, length)
            other_model.update(granules_touched(offset, length, self.size, gran))
        return other, other_model

    @staticmethod
    def dirty_byte_ranges(model: set[int], gran: int, size: int) -> list[tuple[int, int]]:
        return [(i * gran, min((i + 1) * gran, size)) for i in sorted(model)]

    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        other, other_model = self.random_other(data)
        self.bm.merge(other)
        for start, end in self.dirty_byte_ranges(other_model, other.granularity, self.size):
            self.model.update(granules_touched(start, end - start, self.size, self.gran))

    @rule(data=st.data())
    def subtract(self, data: st.DataObject) -> None:
        other, other_model = self.random_other(data)
        self.bm.subtract(other)
        # A granule goes only if every one of its bytes is set in other.
        covered = {
            i
            for i in range(self.nbits)
            if all(
                (b // other.granularity) in other_model
                for b in range(i * self.gran, i * self.gran + self.granule_len(i))
            )
        }
        self.model -= covered

    @rule()
    def bytes_round_trip(self) -> None:
        data = self.bm.to_bytes()
        assert len(data) == (self.nbits + 7) // 8
        assert Bitmap.from_bytes(data, self.size, self.gran) == self.bm
        assert self.bm.copy() == self.bm

    @rule(data=st.data())
    def searches_agree(self, data: st.DataObject) -> None:
        offset = data.draw(self.offsets(), label="offset")
        end = data.draw(st.one_of(st.none(), self.offsets()), label="end")
        stop = self.size if end is None else min(end, self.size)
        lo, hi = offset // self.gran, self.end_bit(stop)
        if offset >= stop:
            lo = hi
        sets = [i for i in range(lo, hi) if i in self.model]
        clears = [i for i in range(lo, hi) if i not in self.model]
        assert self.bm.next_set(offset, end) == (sets[0] * self.gran if sets else None)
        assert self.bm.next_clear(offset, end) == (clears[0] * self.gran if clears else None)
        expected = [
            (i * self.gran, min(j * self.gran, self.size) - i * self.gran)
            for i, j in model_runs(self.model, lo, hi)
        ]
        assert list(self.bm.runs(offset, end)) == expected

        max_length = data.draw(st.integers(1, self.size + self.gran), label="max_length")
        area = self.bm.next_dirty_area(offset, stop if end is None else end, max_length)
        if not expected:
            assert area is None
        else:
            start, length = expected[0]
            cap = max(self.gran, max_length // self.gran * self.gran)
            assert area == (start, min(length, cap))

    # Invariants ---------------------------------------------------------------------------

    @precondition(lambda self: hasattr(self, "bm"))
    @invariant()
    def counts_agree(self) -> None:
        assert self.bm.count() == len(self.model)
        assert self.bm.is_empty() == (not self.model)
        assert self.bm.dirty_bytes() == sum(self.granule_len(i) for i in self.model)

    @precondition(lambda self: hasattr(self, "bm"))
    @invariant()
    def bits_agree(self) -> None:
        for i in range(self.nbits):
            first, last = i * self.gran, i * self.gran + self.granule_len(i) - 1
            assert self.bm.get(first) == self.bm.get(last) == (i in self.model)

    @precondition(lambda self: hasattr(self, "bm"))
    @invariant()
    def runs_agree(self) -> None:
        expected = [
            (i * self.gran, min(j * self.gran, self.size) - i * self.gran)
            for i, j in model_runs(self.model, 0, self.nbits)
        ]
        assert list(self.bm.runs()) == expected


BitmapMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=20, deadline=None)
TestBitmapMachine = BitmapMachine.TestCase
