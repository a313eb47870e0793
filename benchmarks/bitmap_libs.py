"""Pick the bitmap backend for ``blockbackup.block.bitmap`` by measurement.

DESIGN.md asks for a C-accelerated bitmap library (``bitarray`` or ``pyroaring``) chosen by
measurement.  This script times the operations the dirty/to-copy bitmaps actually perform on
a 4 TiB disk at 64 KiB granularity (64 Mi bits): setting and resetting ranges, walking the
dirty runs with next-set/next-clear searches, counting, single-bit lookups and
serialisation, over a sparse and two dense patterns, and reports the memory each library
needs.

Run it with ``.venv/bin/python benchmarks/bitmap_libs.py`` (add ``--quick`` for a smaller
disk).  ``pyroaring`` is optional: install it into the venv only to benchmark.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Protocol, TypeVar

from bitarray import bitarray

TIB = 1 << 40
KIB = 1 << 10
T = TypeVar("T")


class Backend(Protocol):
    """The handful of primitives ``Bitmap`` needs from a library."""

    name: str

    def set_range(self, start: int, stop: int) -> None: ...
    def reset_range(self, start: int, stop: int) -> None: ...
    def fill(self) -> None: ...
    def get(self, i: int) -> bool: ...
    def next_set(self, start: int, stop: int) -> int: ...
    def next_clear(self, start: int, stop: int) -> int: ...
    def count(self) -> int: ...
    def to_bytes(self) -> bytes: ...
    def memory(self) -> int: ...


class BitarrayBackend:
    """Plain bit vector: 1 bit per granule, ``find`` scans words in C."""

    name = "bitarray"

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self.ba = bitarray(nbits, endian="little")
        self.ba.setall(0)

    def set_range(self, start: int, stop: int) -> None:
        self.ba[start:stop] = 1

    def reset_range(self, start: int, stop: int) -> None:
        self.ba[start:stop] = 0

    def fill(self) -> None:
        self.ba.setall(1)

    def get(self, i: int) -> bool:
        return bool(self.ba[i])

    def next_set(self, start: int, stop: int) -> int:
        return int(self.ba.find(1, start, stop))

    def next_clear(self, start: int, stop: int) -> int:
        return int(self.ba.find(0, start, stop))

    def count(self) -> int:
        return int(self.ba.count(1))

    def to_bytes(self) -> bytes:
        return bytes(self.ba.tobytes())

    def memory(self) -> int:
        return sys.getsizeof(self.ba)  # object header plus the allocated buffer


class RoaringBackend:
    """Compressed bitmap; it has no next-clear search, so we binary-search with ``rank``."""

    name = "pyroaring"

    def __init__(self, nbits: int) -> None:
        import pyroaring

        self.nbits = nbits
        self.bm = pyroaring.BitMap()

    def set_range(self, start: int, stop: int) -> None:
        self.bm.add_range(start, stop)

    def reset_range(self, start: int, stop: int) -> None:
        self.bm.remove_range(start, stop)

    def fill(self) -> None:
        self.bm.add_range(0, self.nbits)

    def get(self, i: int) -> bool:
        return i in self.bm

    def next_set(self, start: int, stop: int) -> int:
        try:
            i = int(self.bm.next_set_bit(start))
        except ValueError:
            return -1
        return i if i < stop else -1

    def next_clear(self, start: int, stop: int) -> int:
        # No native next-clear: gallop then bisect with contains_range(), which is O(log n)
        # per call (set-difference against a window bitmap was linear in the bitmap).
        if start >= stop:
            return -1
        if start not in self.bm:
            return start
        if self.bm.contains_range(start, stop):
            return -1
        lo, step = start + 1, 1  # invariant: [start, lo) is all set
        while lo + step <= stop and self.bm.contains_range(start, lo + step):
            lo += step
            step *= 2
        hi = min(stop, lo + step)  # [start, hi) holds a clear bit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.bm.contains_range(start, mid):
                lo = mid
            else:
                hi = mid
        return lo

    def count(self) -> int:
        return len(self.bm)

    def to_bytes(self) -> bytes:
        return bytes(self.bm.serialize())

    def memory(self) -> int:
        self.bm.run_optimize()
        self.bm.shrink_to_fit()
        st = self.bm.get_statistics()
        return int(
            st["n_bytes_array_containers"]
            + st["n_bytes_bitset_containers"]
            + st["n_bytes_run_containers"]
            + 16 * st["n_containers"]  # container headers (type, key, pointer)
        )


class BlockbackupBackend:
    """The chosen wrapper, ``blockbackup.block.bitmap.Bitmap``, to show its own overhead."""

    name = "Bitmap(bitarray)"
    GRAN = 64 * KIB

    def __init__(self, nbits: int) -> None:
        from blockbackup.block.bitmap import Bitmap

        self.nbits = nbits
        self.bm = Bitmap(nbits * self.GRAN, self.GRAN)

    def set_range(self, start: int, stop: int) -> None:
        self.bm.set(start * self.GRAN, (stop - start) * self.GRAN)

    def reset_range(self, start: int, stop: int) -> None:
        self.bm.reset(start * self.GRAN, (stop - start) * self.GRAN)

    def fill(self) -> None:
        self.bm.fill()

    def get(self, i: int) -> bool:
        return self.bm.get(i * self.GRAN)

    def next_set(self, start: int, stop: int) -> int:
        r = self.bm.next_set(start * self.GRAN, stop * self.GRAN)
        return -1 if r is None else r // self.GRAN

    def next_clear(self, start: int, stop: int) -> int:
        r = self.bm.next_clear(start * self.GRAN, stop * self.GRAN)
        return -1 if r is None else r // self.GRAN

    def count(self) -> int:
        return self.bm.count()

    def to_bytes(self) -> bytes:
        return self.bm.to_bytes()

    def memory(self) -> int:
        return sys.getsizeof(self.bm) + sys.getsizeof(self.bm._bits)


def runs(b: Backend, nbits: int) -> Iterator[tuple[int, int]]:
    i = 0
    while i < nbits:
        s = b.next_set(i, nbits)
        if s < 0:
            return
        e = b.next_clear(s, nbits)
        if e < 0:
            e = nbits
        yield s, e
        i = e


def pattern_ranges(nbits: int, n: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        length = rnd.randint(1, max_len)
        start = rnd.randrange(0, nbits - length)
        out.append((start, start + length))
    return out


def timed(label: str, fn: Callable[[], T], results: dict[str, float]) -> T:
    gc.collect()
    t0 = time.perf_counter()
    value = fn()
    results[label] = time.perf_counter() - t0
    return value


def set_all(b: Backend, ranges: list[tuple[int, int]]) -> None:
    for s, e in ranges:
        b.set_range(s, e)


def reset_all(b: Backend, ranges: list[tuple[int, int]]) -> None:
    for s, e in ranges:
        b.reset_range(s, e)


def count_runs(b: Backend, nbits: int) -> int:
    return sum(1 for _ in runs(b, nbits))


def probe(b: Backend, probes: list[int]) -> int:
    return sum(b.get(i) for i in probes)


def bench(factory: Callable[[int], Backend], nbits: int) -> dict[str, dict[str, float]]:
    patterns = {
        # guest writes during a backup: 10k scattered 64 KiB..1 MiB writes (~0.1% dirty)
        "sparse": pattern_ranges(nbits, 10_000, 16, seed=1),
        # fragmented dirty areas: 300k ranges of 1..64 granules (~14% dirty, many runs)
        "dense-fragmented": pattern_ranges(nbits, 300_000, 64, seed=2),
        # a full backup in progress: filled, then 20k holes of 1..1024 granules cut out
        "dense-runs": pattern_ranges(nbits, 20_000, 1024, seed=3),
    }
    rnd = random.Random(4)
    probes = [rnd.randrange(nbits) for _ in range(200_000)]
    out: dict[str, dict[str, float]] = {}
    for pname, ranges in patterns.items():
        r: dict[str, float] = {}
        b = factory(nbits)
        if pname == "dense-runs":
            timed("fill", b.fill, r)
            timed("set/reset ranges", partial(reset_all, b, ranges), r)
        else:
            timed("set/reset ranges", partial(set_all, b, ranges), r)
        nruns = timed("walk runs", partial(count_runs, b, nbits), r)
        count = timed("count", b.count, r)
        timed("200k get", partial(probe, b, probes), r)
        timed("to_bytes", b.to_bytes, r)
        r["memory MiB"] = b.memory() / (1 << 20)
        r["runs"] = float(nruns)
        r["dirty %"] = 100.0 * count / nbits
        if pname != "dense-runs":
            timed("reset ranges", partial(reset_all, b, ranges), r)
            assert b.count() == 0
        out[pname] = r
        del b
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="256 GiB disk instead of 4 TiB")
    args = ap.parse_args()
    size = (256 << 30) if args.quick else 4 * TIB
    gran = 64 * KIB
    nbits = size // gran
    print(f"disk {size / TIB:g} TiB, granularity {gran // KIB} KiB, {nbits:,} bits")

    factories: list[Callable[[int], Backend]] = [BitarrayBackend, BlockbackupBackend]
    try:
        import pyroaring  # noqa: F401

        factories.append(RoaringBackend)
    except ImportError:
        print("pyroaring not installed: only bitarray measured")

    results = {f(1).name: bench(f, nbits) for f in factories}
    libs = list(results)
    for pname in next(iter(results.values())):
        print(f"\n== {pname}")
        keys = list(results[libs[0]][pname])
        print(f"{'':18}" + "".join(f"{lib:>18}" for lib in libs))
        for k in keys:
            cells = []
            for lib in libs:
                v = results[lib][pname].get(k, float("nan"))
                if k in ("memory MiB", "runs", "dirty %"):
                    cells.append(f"{v:>18,.2f}" if k != "runs" else f"{v:>18,.0f}")
                else:
                    cells.append(f"{v * 1000:>15,.1f} ms")
            print(f"{k:18}" + "".join(cells))


if __name__ == "__main__":
    main()
