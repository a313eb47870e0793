"""Persistent dirty bitmaps: load them when a node opens, store them when it closes, and keep
a write-ahead dirty log so that a crash never loses a change from tracking.

Why a write-ahead log and not QEMU's "in use" flag: QEMU only stores a bitmap at a clean
close and marks it *inconsistent* (unusable) after a crash, which forces a full backup. Here
every persistent bitmap has a *durable* copy on disk (the sidecar file ``IMAGE.bbmap``: the
bitmaps themselves for raw images, a journal next to the image for qcow2) and the rule is:

    before a write reaches the image, every granule it touches is set in the durable copy.

A write gate (:meth:`NodeStore.before_write`, registered with
``node.add_write_gate``) enforces it. Writes to granules already durable pass at once;
a write to a new granule sets it in ``mem`` (the next durable state) and waits for the
group commit: one flusher task writes the changed 4 KiB blocks and ``fdatasync``\\ s them
for every writer that joined meanwhile. Costs follow changed data.

Bits are removed from the durable copy (``block-dirty-bitmap-clear``, a successful
incremental) only by a *shrink*, which takes the new durable state from the in-memory bitmap
while the node is quiesced: no write is then between its hook and its dirty mark, so the
in-memory bitmap covers every write that may still reach the image.

Ownership: each graph has one :class:`BitmapStores` (its ``bitmap_stores``): the sidecar
paths its nodes hold and the open/close hooks the graph calls; a node's :class:`NodeStore`
is plugged into the node's bitmap registry. Nothing is module-global, so two graphs in one
process never share a store.

The argument and the formats are written up in ``docs/bitmap-sidecar.md``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitarray import bitarray
from bitarray.util import zeros

from blockbackup._aio import run_blocking
from blockbackup.block.bitmap import Bitmap
from blockbackup.block.bitmap_store import sidecar as sc
from blockbackup.block.bitmap_store.image import FreshBitmap, ImageBitmaps, StoredEntry
from blockbackup.block.dirty_bitmap import BitmapRegistry, DirtyBitmap, bitmaps_of
from blockbackup.block.driver import io_error

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode

__all__ = ["BitmapStores", "NodeStore", "store_of"]

_log = logging.getLogger(__name__)

#: The write-ahead log marks this many bytes around a new dirty granule durable at once, so
#: a random first pass costs one commit per span rather than one per granule. 4 MiB: fio
#: 4 KiB random writes through NBD on a 4 GiB image ran a first pass at 0.80x of no bitmap
#: with 1 MiB spans and 0.88x with 4 MiB (8 MiB: no better); the price is a coarser superset
#: after a crash only (a clean close stores the exact bits).
DURABLE_SPAN = 4 << 20
_SPAN_SHIFT = DURABLE_SPAN.bit_length() - 1


def store_of(node: BlockNode) -> NodeStore | None:
    """The persistence of ``node``'s bitmaps, if its image can hold them."""
    store = bitmaps_of(node).store
    return store if isinstance(store, NodeStore) else None


def _local_file(node: BlockNode) -> str | None:
    driver = node.driver
    name = getattr(driver, "filename", None)
    if driver.driver_name in ("file", "host_device") and isinstance(name, str):
        return os.path.realpath(name)
    return None


def _bits_of(bm: Bitmap) -> bitarray:
    bits = bitarray(endian="little")
    bits.frombytes(bm.to_bytes())
    del bits[bm.nbits :]
    return bits


def _bits_from(data: bytes, nbits: int) -> bitarray:
    bits = bitarray(endian="little")
    bits.frombytes(data)
    if len(bits) < nbits:
        bits.extend(zeros(nbits - len(bits), endian="little"))
    del bits[nbits:]
    return bits


@dataclass(eq=False)
class Lineage:
    """The durable state of one persistent bitmap name (the bitmap and its successors)."""

    name: str
    granularity: int
    nbits: int
    #: The next durable state: set before any write to a granule may proceed.
    mem: bitarray
    #: What the last completed commit made durable.
    disk: bitarray
    #: What the commit in flight will make durable (None: none in flight).
    target: bitarray | None = None
    first_block: int = 0

    def __post_init__(self) -> None:
        self.shift = self.granularity.bit_length() - 1
        #: Granules made durable together.
        self.span = max(1, DURABLE_SPAN >> self.shift)
        self.dirty_blocks: set[int] = set()

    def covered(self, bits: bitarray, g0: int, g1: int) -> bool:
        return bits.count(1, g0, g1) == g1 - g0

    def spans(self, offset: int, length: int) -> tuple[int, int]:
        """The granules ``[g0, g1)`` of the whole spans a write touches.

        Durable in spans of DURABLE_SPAN bytes (or one granule, if larger): one commit
        covers the neighbours too (a superset after a crash only; a clean close stores the
        exact bits).
        """
        q = self.span
        g0 = (offset >> self.shift) // q * q
        g1 = min(-(-(((offset + length - 1) >> self.shift) + 1) // q) * q, self.nbits)
        return g0, g1


def _recorder(registry: BitmapRegistry, lin: Lineage) -> DirtyBitmap | None:
    """The bitmap that records writes for ``lin`` now (its successor while frozen), if any."""
    bearer = registry.get(lin.name)
    if bearer is None:
        return None
    rec = bearer.successor if bearer.successor is not None else bearer
    return rec if rec.enabled else None


class NodeStore:
    """Where one node's persistent bitmaps live, and their write-ahead dirty log."""

    def __init__(
        self,
        stores: BitmapStores,
        node: BlockNode,
        kind: str,
        path: str | None,
        *,
        writable: bool,
    ) -> None:
        self.stores = stores
        self.node = node
        #: "sidecar" (the sidecar holds the bitmaps) or "qcow2" (the image does; the
        #: sidecar is its journal while open).
        self.kind = kind
        self.path = path
        self.writable = writable
        self.lineages: dict[str, Lineage] = {}
        #: Errors found when loading (also logged); for users and tests.
        self.load_errors: list[str] = []
        #: Stored qcow2 entries kept verbatim: inconsistent or not understood.
        self.kept: dict[str, StoredEntry] = {}
        #: A sidecar we could not read: never deleted, only replaced by new bitmaps.
        self.foreign = False
        self._fd = -1
        self._layout_dirty = False
        self._done_gen = 0
        self._failed_gen = 0
        self._inflight_gen = 0
        self._want_gen = 0
        self._error: OSError | None = None
        self._progress = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._hooked = False
        self._closed = False
        #: The file child whose store this one took over (it gets it back if it outlives us).
        self.taken_from: BlockNode | None = None
        self._safe = bitarray()
        self._forget_safe()

    @property
    def journaling(self) -> bool:
        """Whether writes are made durable in the dirty log before they proceed."""
        return self.writable and self.path is not None

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    async def attach(cls, stores: BitmapStores, node: BlockNode) -> NodeStore | None:
        """Create the store of a newly opened node and load its bitmaps."""
        driver = node.driver
        writable = not node.read_only
        claimed = stores.claimed
        holder: BlockNode | None = None  # the file child whose store this node takes over
        if isinstance(driver, ImageBitmaps):
            file = driver.bitmap_file
            image = _local_file(file)
            path = sc.sidecar_path(image) if image is not None else None
            if path is not None and path in claimed:
                if await stores.take_over(path, file, node):
                    holder = file
                else:
                    path = None
            store = cls(
                stores, node, "qcow2", path, writable=writable and driver.can_store_bitmaps()
            )
        else:
            child = None
            if driver.driver_name == "raw":
                if getattr(driver, "window", True):
                    return None
                child = node.children.get("file")
                image = _local_file(child) if child is not None else None
            elif driver.driver_name in ("file", "host_device") and not node.implicit:
                image = _local_file(node)
            else:
                return None
            if image is None:
                return None
            path = sc.sidecar_path(image)
            if path in claimed:
                if child is None or not await stores.take_over(path, child, node):
                    return None
                holder = child
            store = cls(stores, node, "sidecar", path, writable=writable)
        store.taken_from = holder
        if store.path is not None:
            claimed.add(store.path)
        bitmaps_of(node).store = store
        if store.kind == "qcow2":
            assert isinstance(driver, ImageBitmaps)
            await store._load_qcow2(driver)
        else:
            await store._load_sidecar()
        if store.lineages and store.journaling:
            store._install()
            store._layout_dirty = True
            await store._wait(store._request())
        if store.kind == "qcow2" and writable and store.lineages:
            assert isinstance(driver, ImageBitmaps)
            await driver.mark_bitmaps_in_use(set(store.lineages))
        return store

    def _add_loaded(
        self, name: str, granularity: int, bits: bitarray | None, *, enabled: bool
    ) -> DirtyBitmap:
        """Register a loaded bitmap; ``bits`` None: inconsistent."""
        node = self.node
        bm = DirtyBitmap(node, name, granularity, persistent=True, disabled=True)
        if bits is None:
            bm.inconsistent = True
        else:
            bm.bitmap = Bitmap.from_bytes(bits.tobytes(), node.size, granularity)
            self._track(name, granularity, bits)
            if enabled:
                bm._start_recording()
        bitmaps_of(node)._append(bm)
        return bm

    def _track(self, name: str, granularity: int, bits: bitarray) -> Lineage:
        lin = Lineage(name, granularity, len(bits), bits.copy(), bits.copy())
        self.lineages[name] = lin
        self._forget_safe()  # a new lineage is durable nowhere yet
        return lin

    def _forget_safe(self) -> None:
        """Drop every span of the :meth:`_passes_now` cache (something may have stopped
        being durable)."""
        self._safe = zeros(-(-self.node.size // DURABLE_SPAN) or 1, endian="little")

    def _problem(self, text: str) -> None:
        _log.error("%s", text)
        self.load_errors.append(text)

    async def _read_sidecar(self) -> sc.SidecarImage | None:
        assert self.path is not None
        try:
            return await run_blocking(sc.read, self.path)
        except (sc.SidecarError, OSError) as err:
            self._problem(f"bitmap sidecar {self.path}: {err}; its bitmaps cannot be loaded")
            self.foreign = True
            return None

    def _entry_bits(
        self, img: sc.SidecarImage, e: sc.SidecarEntry, *, journal: bool
    ) -> bitarray | None:
        """The bits of a sidecar entry, or None (inconsistent, with the reason logged)."""
        where = f"bitmap '{e.name}' in {self.path}"
        nbits = -(-self.node.size // e.granularity)
        if img.version != sc.VERSION:
            self._problem(f"{where}: unsupported sidecar version {img.version}")
            return None
        if e.flags & sc.ENTRY_INCONSISTENT:
            return None
        if e.nbits != nbits or img.size != self.node.size:
            self._problem(f"{where}: the image size changed; the bitmap is inconsistent")
            return None
        assert e.data is not None
        bits = _bits_from(e.data, nbits)
        if e.bad_blocks:
            if img.flags & sc.FLAG_CLEAN and not journal:
                self._problem(f"{where}: checksum mismatch or truncated data")
                return None
            # An unclean log: a block torn by the crash. All ones is a superset.
            _log.warning("%s: damaged log blocks %s, marked all dirty", where, e.bad_blocks)
            per = sc.PAYLOAD * 8
            for k in e.bad_blocks:
                bits[k * per : min((k + 1) * per, nbits)] = 1
        return bits

    async def _load_sidecar(self) -> None:
        img = await self._read_sidecar()
        if img is None:
            return
        if img.flags & sc.FLAG_JOURNAL:
            self._problem(f"{self.path} is the journal of a qcow2 image, not a raw sidecar")
            self.foreign = True
            return
        for e in img.entries:
            bits = self._entry_bits(img, e, journal=False)
            self._add_loaded(e.name, e.granularity, bits, enabled=bool(e.flags & sc.ENTRY_ENABLED))

    async def _load_qcow2(self, drv: ImageBitmaps) -> None:
        journal: dict[str, tuple[sc.SidecarImage, sc.SidecarEntry]] = {}
        if self.path is not None and await run_blocking(os.path.exists, self.path):
            img = await self._read_sidecar()
            self.foreign = False  # a journal is ours to replace
            if img is not None and img.flags & sc.FLAG_JOURNAL and not img.flags & sc.FLAG_CLEAN:
                journal = {e.name: (img, e) for e in img.entries}
        try:
            stored = await drv.stored_bitmaps()
        except OSError as err:
            self._problem(f"qcow2 bitmap directory of {self.node.name}: {err}")
            stored = []
        nbits_of = {}
        for s in stored:
            if not s.supported:
                self.kept[s.name] = s  # not ours to interpret: kept as it is
                continue
            nbits_of[s.name] = -(-self.node.size // s.granularity)
            if s.in_use and s.name in journal:
                img, e = journal.pop(s.name)
                bits = self._entry_bits(img, e, journal=True)
                self._add_loaded(
                    s.name, e.granularity, bits, enabled=bool(e.flags & sc.ENTRY_ENABLED)
                )
                if bits is None:
                    self.kept[s.name] = s
                continue
            journal.pop(s.name, None)
            if s.in_use:
                # QEMU's rule: not stored cleanly, and no log of ours covers it.
                self._add_loaded(s.name, s.granularity, None, enabled=False)
                self.kept[s.name] = s
                continue
            try:
                data = await drv.load_stored_bitmap(s)
            except OSError as err:
                self._problem(f"qcow2 bitmap '{s.name}': {err}")
                self._add_loaded(s.name, s.granularity, None, enabled=False)
                self.kept[s.name] = s
                continue
            self._add_loaded(
                s.name, s.granularity, _bits_from(data, nbits_of[s.name]), enabled=s.auto
            )
        for name, (img, e) in journal.items():  # created after the last clean store
            bits = self._entry_bits(img, e, journal=True)
            if bits is not None:
                self._add_loaded(
                    name, e.granularity, bits, enabled=bool(e.flags & sc.ENTRY_ENABLED)
                )

    # -- bitmaps appearing and going ----------------------------------------------------------

    def can_store(self, granularity: int) -> str | None:
        """Why a new persistent bitmap cannot be stored here (None: it can)."""
        if not self.writable or self._closed:
            return "Operation not supported"
        if self.kind == "qcow2" and granularity > 1 << 31:
            return "Granularity exceeds maximum"
        return None

    def adopt(self, bm: DirtyBitmap) -> None:
        """A new persistent bitmap (``block-dirty-bitmap-add``)."""
        assert bm.name is not None
        self._track(bm.name, bm.granularity, _bits_of(bm.bitmap))
        if self.journaling:
            self._install()
            self._layout_dirty = True
            self._request()

    def forget(self, name: str) -> None:
        """A persistent bitmap was removed: from the log now, from the image soon."""
        self.lineages.pop(name, None)
        stored = self.kept.pop(name, None)
        if self.journaling:
            self._layout_dirty = True
            self._request()
        if self.kind == "qcow2" and self.writable:
            self._spawn(self._drop_stored(name, stored))

    def changed(self, bm: DirtyBitmap, *, shrink: bool = False, flags: bool = False) -> None:
        """The in-memory bits or flags of a persistent bitmap changed outside the write path."""
        lin = self.lineages.get(bm.name) if bm.name is not None else None
        if lin is None or not self.journaling:
            return
        if flags:
            self._layout_dirty = True
        if shrink:
            self._spawn(self._shrink())
            return
        logical = self._logical(lin)
        if logical is not None:
            grown = logical & ~lin.mem
            if grown.any():
                lin.mem |= logical
                lin.dirty_blocks.update(range(self._nblocks(lin)))
        self._request()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("bitmap store of %s: %s", self.node.name, task.exception())

    async def settle(self) -> None:
        """Wait until every change so far is durable (the log and the image)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.journaling and self._want_gen > self._done_gen:
            await self._wait(self._want_gen)

    # -- the write path ------------------------------------------------------------------------

    def _install(self) -> None:
        if not self._hooked:
            self.node.add_write_gate(self.before_write)
            self._hooked = True

    def _uninstall(self) -> None:
        if self._hooked:
            self.node.remove_write_gate(self.before_write)
            self._hooked = False

    def _nblocks(self, lin: Lineage) -> int:
        nbytes = (lin.nbits + 7) // 8
        return (nbytes + sc.PAYLOAD - 1) // sc.PAYLOAD

    def before_write(self, offset: int, length: int) -> Coroutine[Any, Any, None] | None:
        """The write gate (one admission, as a before-write hook): ``None`` when every
        granule the write touches is durable already, the common case, which keeps the
        request layer's write-at-once path; otherwise the coroutine that records the
        write and waits for the commit making its granules durable. It holds nothing until
        it runs: the inline path closes it and the awaited write calls the gate again.
        """
        if self._passes_now(offset, length):
            return None
        return self._make_durable(offset, length)

    async def _make_durable(self, offset: int, length: int) -> None:
        """Make the granules of a write durable before it may proceed."""
        need = 0
        for lin, rec, g0, g1 in self._spans(offset, length):
            # Marked now rather than after the gate: a shrink then sees this write.
            rec.bitmap.set(offset, length)
            if self._durable(lin, g0, g1):
                continue  # durable, and no commit in flight takes it away
            in_mem = lin.covered(lin.mem, g0, g1)
            target = lin.target
            if in_mem and target is not None and lin.covered(target, g0, g1):
                need = max(need, self._inflight_gen)
                continue
            lin.mem[g0:g1] = 1
            lin.dirty_blocks.update(
                range((g0 >> 3) // sc.PAYLOAD, ((g1 - 1) >> 3) // sc.PAYLOAD + 1)
            )
            need = max(need, self._request())
        if need:
            await self._wait(need)

    def _passes_now(self, offset: int, length: int) -> bool:
        """Whether a write may pass the gate at once: every span it touches is durable
        already in every recording lineage, and no commit in flight takes one away.

        It changes nothing visible: the recording bitmaps are the node's dirty trackers,
        which the request layer marks right after the gates, with no await in between
        (:meth:`_make_durable` marks them itself because it may wait).

        Why a cache: this runs for every guest write, and after the first pass nearly every
        span is durable for good. ``_safe`` has one bit per DURABLE_SPAN of the node, set
        once a span is durable in every lineage (recording or not, so that enabling one
        never makes a bit stale); it can only go stale when a lineage's ``mem`` loses bits
        (:meth:`_shrink`) or a lineage appears (:meth:`_track`), and both drop it. ``disk``
        loses a bit only through a commit of a ``mem`` that had lost it first.
        """
        s0 = offset >> _SPAN_SHIFT
        s1 = (offset + length - 1) >> _SPAN_SHIFT
        safe = self._safe
        if s1 < len(safe) and (safe[s0] if s0 == s1 else safe.count(1, s0, s1 + 1) > s1 - s0):
            return True
        everywhere = True
        registry = bitmaps_of(self.node)
        for lin in self.lineages.values():
            g0, g1 = lin.spans(offset, length)
            if g0 < g1 and not self._durable(lin, g0, g1):
                if _recorder(registry, lin) is not None:
                    return False
                everywhere = False
        if everywhere and s1 < len(safe):
            safe[s0 : s1 + 1] = 1
        return True

    def _spans(self, offset: int, length: int) -> Iterator[tuple[Lineage, DirtyBitmap, int, int]]:
        """Per recording lineage: the bitmap recording writes now and the write's spans."""
        if length <= 0:
            return
        registry = bitmaps_of(self.node)
        for lin in self.lineages.values():
            rec = _recorder(registry, lin)
            if rec is None:
                continue
            g0, g1 = lin.spans(offset, length)
            if g0 < g1:
                yield lin, rec, g0, g1

    @staticmethod
    def _durable(lin: Lineage, g0: int, g1: int) -> bool:
        """Spans ``[g0, g1)`` are durable and no commit in flight takes them away."""
        target = lin.target
        return (
            lin.covered(lin.mem, g0, g1)
            and lin.covered(lin.disk, g0, g1)
            and (target is None or lin.covered(target, g0, g1))
        )

    def _request(self) -> int:
        """Ask for a commit of everything in ``mem`` now; return its generation."""
        gen = (self._inflight_gen or max(self._done_gen, self._failed_gen)) + 1
        self._want_gen = max(self._want_gen, gen)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())
        return gen

    async def _wait(self, gen: int) -> None:
        while self._done_gen < gen:
            if self._failed_gen >= gen:
                err = io_error(errno.EIO, f"persistent bitmap log of {self.node.name} failed")
                if self._error is not None:
                    err.add_note(str(self._error))
                raise err
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.ensure_future(self._flush_loop())
            await self._progress.wait()

    def _image(self, *, clean: bool, exact: bool) -> sc.SidecarImage:
        """A whole sidecar from ``mem`` (or the exact in-memory bits at a clean close)."""
        registry = bitmaps_of(self.node)
        flags = sc.FLAG_CLEAN if clean else 0
        if self.kind == "qcow2":
            flags |= sc.FLAG_JOURNAL
        img = sc.SidecarImage(flags, self.node.size, [])
        for lin in self.lineages.values():
            bearer = registry.get(lin.name)
            eflags = sc.ENTRY_ENABLED if bearer is not None and bearer.recording else 0
            bits = lin.mem
            if exact:
                logical = self._logical(lin)
                bits = logical if logical is not None else bits
            gbits = lin.granularity.bit_length() - 1
            img.entries.append(
                sc.SidecarEntry(lin.name, gbits, eflags, lin.nbits, 0, bits.tobytes())
            )
        for bm in registry:
            if bm.persistent and bm.inconsistent and bm.name is not None and self.kind == "sidecar":
                gbits = bm.granularity.bit_length() - 1
                nbits = bm.bitmap.nbits
                img.entries.append(
                    sc.SidecarEntry(
                        bm.name, gbits, sc.ENTRY_INCONSISTENT, nbits, 0, bytes(-(-nbits // 8))
                    )
                )
        return img

    def _logical(self, lin: Lineage) -> bitarray | None:
        bearer = bitmaps_of(self.node).get(lin.name)
        if bearer is None:
            return None
        bits = _bits_of(bearer.bitmap)
        if bearer.successor is not None:
            bits |= _bits_of(bearer.successor.bitmap)
        return bits

    async def _flush_loop(self) -> None:
        while self._want_gen > max(self._done_gen, self._failed_gen) and not self._closed:
            gen = max(self._done_gen, self._failed_gen) + 1
            self._inflight_gen = gen
            lins = list(self.lineages.values())
            captured = {id(lin): lin.dirty_blocks for lin in lins}
            for lin in lins:
                lin.target = lin.mem.copy()
                lin.dirty_blocks = set()
            layout = self._layout_dirty
            self._layout_dirty = False
            try:
                if layout:
                    img = self._image(clean=False, exact=False)
                    await run_blocking(self._rewrite, img)
                    for lin, e in zip(lins, img.entries, strict=False):
                        lin.first_block = e.first_block
                else:
                    blocks: list[tuple[int, bytes]] = []
                    for lin in lins:
                        assert lin.target is not None
                        raw = lin.target.tobytes()
                        at = lin.first_block
                        blocks += [
                            (at + k, sc.block_bytes(raw, k, at + k)) for k in captured[id(lin)]
                        ]
                    if blocks:
                        await run_blocking(sc.write_blocks, self._fd, blocks)
            except OSError as err:
                _log.error("persistent bitmap log of %s: %s", self.node.name, err)
                self._error = err
                self._failed_gen = gen
                self._layout_dirty = True  # retry everything with a full rewrite next time
                for lin in lins:
                    lin.dirty_blocks |= captured[id(lin)]
            else:
                for lin in lins:
                    assert lin.target is not None
                    lin.disk = lin.target
                self._done_gen = gen
            finally:
                for lin in lins:
                    lin.target = None
                self._inflight_gen = 0
                progress, self._progress = self._progress, asyncio.Event()
                progress.set()

    def _rewrite(self, img: sc.SidecarImage) -> None:
        """Replace the log file with ``img`` and reopen it (blocking, flusher only)."""
        assert self.path is not None
        sc.write_atomic(self.path, img)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)

    async def _shrink(self) -> None:
        """Take the durable state down to the in-memory bits (after a clear or a backup)."""
        async with self.node.quiesced():
            for lin in self.lineages.values():
                logical = self._logical(lin)
                if logical is None:
                    continue
                if logical != lin.mem:
                    lin.mem = logical
                    self._forget_safe()
                    lin.dirty_blocks.update(range(self._nblocks(lin)))
            gen = self._request()
        await self._wait(gen)

    # -- closing -------------------------------------------------------------------------------

    async def _drop_stored(self, name: str, stored: StoredEntry | None) -> None:
        """Remove one bitmap from the image's directory now (``block-dirty-bitmap-remove``)."""
        drv = self.node.driver
        assert isinstance(drv, ImageBitmaps)
        await drv.remove_stored_bitmap(name)

    async def close(self) -> None:
        """Clean close: store every persistent bitmap exactly, then retire the log."""
        if self._closed:
            return
        await self.settle()
        self._closed = True
        self._uninstall()
        try:
            if self.writable:
                if self.kind == "qcow2":
                    await self._store_qcow2()
                elif self.lineages or self.kept or any(b.persistent for b in bitmaps_of(self.node)):
                    await run_blocking(self._store_sidecar, self._image(clean=True, exact=True))
                elif self.path is not None and not self.foreign:
                    await run_blocking(sc.remove_durably, self.path)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self.path is not None:
                self.stores.claimed.discard(self.path)

    def _store_sidecar(self, img: sc.SidecarImage) -> None:
        assert self.path is not None
        sc.write_atomic(self.path, img)

    async def _store_qcow2(self) -> None:
        drv = self.node.driver
        assert isinstance(drv, ImageBitmaps)
        if not drv.can_store_bitmaps():
            return
        fresh: list[FreshBitmap] = []
        for bm in bitmaps_of(self.node):
            if not bm.persistent or bm.name is None or bm.name in self.kept:
                continue
            lin = self.lineages.get(bm.name)
            logical = self._logical(lin) if lin is not None else None
            if logical is None:
                continue
            fresh.append(FreshBitmap(bm.name, bm.granularity, bm.recording, logical.tobytes()))
        await drv.store_bitmaps(fresh, self.kept.values())
        if self.path is not None:
            await run_blocking(sc.remove_durably, self.path)


class BitmapStores:
    """The persistence of one graph's bitmaps: the sidecar paths its nodes hold, and the
    hooks the graph calls when a node opens and before it closes."""

    def __init__(self) -> None:
        #: Sidecar paths held by a node of this graph (one node per image file).
        self.claimed: set[str] = set()

    async def node_opened(self, node: BlockNode) -> None:
        """Load the persistent bitmaps of a node that just opened (never raises OSError)."""
        try:
            await NodeStore.attach(self, node)
        except OSError as err:
            _log.error("persistent bitmaps of %s could not be loaded: %s", node.name, err)

    async def node_closing(self, node: BlockNode) -> None:
        """Store the persistent bitmaps of a node about to close (clean close).

        If its sidecar was taken over from a file child that stays open, the child gets it
        back (with the bitmaps), so that writes to the file keep being tracked. (Not for
        qcow2: its bitmaps live in the image, which a file node cannot interpret; and its
        close writes them through that child, which must not be quiesced then.)
        """
        registry = bitmaps_of(node)
        store = registry.store
        registry.store = None
        if not isinstance(store, NodeStore):
            return
        holder = store.taken_from
        if (
            holder is None
            or store.kind != "sidecar"
            or holder.graph.find(holder.name) is not holder
        ):
            await self._close_store(store)
            return
        async with holder.quiesced():
            await self._close_store(store)
            await self.node_opened(holder)

    async def take_over(self, path: str, holder: BlockNode, owner: BlockNode) -> bool:
        """Move the sidecar ``path`` from the file node ``holder`` to ``owner``, a whole-image
        format node just opened over it; True when done.

        Why: the sidecar belongs to the image, and the node users name is the format node
        (``--blockdev driver=file,node-name=f,... --blockdev driver=raw,file=f``). Both cover
        the same bytes, so the holder's persistent bitmaps are stored cleanly (exact) and
        removed from it, and ``owner`` loads them next. Refused while one of them is in use
        (a job, an export, a transaction) or the holder has users, or if ``owner`` is
        read-only over a writable holder: then the holder keeps them.
        """
        store = store_of(holder)
        if store is None or store.path != path or store._closed:
            return False
        if owner.read_only and not holder.read_only:
            return False
        registry = bitmaps_of(holder)
        persistent = [bm for bm in registry if bm.persistent]
        if holder.users or any(bm.busy for bm in persistent):
            _log.warning("persistent bitmaps of %s stay on %s: in use", path, holder.name)
            return False
        async with holder.quiesced():  # no write between the store's close and the move
            registry.store = None
            await self._close_store(store)
            for bm in persistent:
                bm._stop_recording()
                registry._remove(bm)
        return path not in self.claimed

    @staticmethod
    async def _close_store(store: NodeStore) -> None:
        try:
            await store.close()
        except OSError as err:
            # The log (if any) stays: the next open recovers from it as from a crash.
            _log.error("persistent bitmaps of %s could not be stored: %s", store.node.name, err)
