"""Named dirty bitmaps of a node: change tracking for incremental backups.

Why a layer over :class:`~blockbackup.block.bitmap.Bitmap`: QEMU's dirty bitmaps carry
names, enable/disable, ``busy``, ``persistent`` and, for backups, *successors*, and their
rules decide whether a change can ever be lost from tracking. They live here, with no I/O.

Tracking: an enabled bitmap registers itself in its node's ``dirty_trackers``, so every
write, write-zeroes and discard of the node (from any export, job or filter) marks it
before the driver sees the request.

Successors (how a backup job uses a bitmap): at the backup's point in time the bitmap is
*frozen* (:meth:`DirtyBitmap.create_successor`): it stops recording and an anonymous
successor records the writes made during the job. When the job ends, either

* :meth:`~DirtyBitmap.abdicate`: the successor takes the bitmap's name and the frozen
  content is dropped (it was backed up); or
* :meth:`~DirtyBitmap.reclaim`: the successor is merged back into the frozen bitmap.

Both keep every write made during the job, so tracking is never lost whatever happens.

QEMU lists a node's bitmaps newest first, and a successor is newer than its parent: after
an abdication the surviving bitmap is in the successor's place. The registry keeps that
order.

Persistence: a ``persistent`` bitmap's storage (qcow2 extension or sidecar file, and the
write-ahead dirty log that keeps it correct across a crash) is
:mod:`blockbackup.block.bitmap_store`, which sits above this module and plugs a
:class:`BitmapPersistence` into a node's registry; this module tells it when bits or flags
change outside the write path (:meth:`DirtyBitmap._persist`).

Ownership: the registries belong to the node's graph (:class:`GraphBitmaps`, the graph's
``bitmaps``), so two graphs in one process never see each other's bitmaps.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from blockbackup.block.bitmap import Bitmap
from blockbackup.errors import BlockBackupError

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode

__all__ = [
    "MAX_NAME_SIZE",
    "BitmapPersistence",
    "BitmapRegistry",
    "DirtyBitmap",
    "GraphBitmaps",
    "bitmaps_of",
    "default_granularity",
    "find_bitmap",
]

#: QEMU's ``BDRV_BITMAP_MAX_NAME_SIZE``.
MAX_NAME_SIZE = 1023
_MIN_GRANULARITY = 512
_DEFAULT_GRANULARITY = 64 * 1024


class BitmapPersistence(Protocol):
    """Where a node's persistent bitmaps are stored (``bitmap_store.NodeStore``)."""

    def can_store(self, granularity: int) -> str | None:
        """Why a new persistent bitmap cannot be stored (None: it can)."""

    def adopt(self, bm: DirtyBitmap) -> None:
        """A new persistent bitmap."""

    def forget(self, name: str) -> None:
        """A persistent bitmap was removed."""

    def changed(self, bm: DirtyBitmap, *, shrink: bool = False, flags: bool = False) -> None:
        """Bits or flags changed outside the write path."""


def default_granularity(node: BlockNode) -> int:
    """The node's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB if it has none."""
    cluster = node.cluster_size
    if not cluster:
        return _DEFAULT_GRANULARITY
    return min(max(cluster, 4096), _DEFAULT_GRANULARITY)


class DirtyBitmap:
    """One dirty bitmap of a node (anonymous when it is a backup's successor)."""

    def __init__(
        self,
        node: BlockNode,
        name: str | None,
        granularity: int,
        *,
        persistent: bool = False,
        disabled: bool = False,
    ) -> None:
        self.node = node
        self.name = name
        self.bitmap = Bitmap(node.size, granularity)
        self.persistent = persistent
        #: QEMU's "inconsistent": a stored bitmap that could not be loaded correctly.
        self.inconsistent = False
        self._disabled = True
        #: Set while something other than a successor holds it (an export, a transaction).
        self.busy_flag = False
        self.successor: DirtyBitmap | None = None
        if not disabled:
            self._start_recording()

    def __repr__(self) -> str:
        return (
            f"<DirtyBitmap {self.name!r} on {self.node.name!r} count={self.count} "
            f"recording={self.recording} busy={self.busy}>"
        )

    # -- state ------------------------------------------------------------------------------

    @property
    def granularity(self) -> int:
        return self.bitmap.granularity

    @property
    def disabled(self) -> bool:
        """Whether this bitmap itself records nothing (a frozen bitmap is disabled)."""
        return self._disabled

    @property
    def enabled(self) -> bool:
        """Whether it records writes itself (an export of it would see it change)."""
        return not self._disabled

    @property
    def frozen(self) -> bool:
        """Whether a backup job holds it (its successor records the writes)."""
        return self.successor is not None

    @property
    def busy(self) -> bool:
        """In use by a job, an export or a pending transaction: most commands refuse it."""
        return self.busy_flag or self.frozen

    @property
    def recording(self) -> bool:
        """QEMU's ``recording``: this bitmap, or its successor, records writes."""
        if self.successor is not None:
            return self.successor.recording
        return not self._disabled

    @property
    def count(self) -> int:
        """QEMU's ``count``: dirty granules times the granularity, in bytes."""
        return self.bitmap.count() * self.bitmap.granularity

    def check_usable(self) -> None:
        """QEMU's ``bdrv_dirty_bitmap_check``: refuse a busy or inconsistent bitmap."""
        if self.busy:
            raise BlockBackupError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot be used"
            )
        if self.inconsistent:
            raise BlockBackupError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    # -- tracking ---------------------------------------------------------------------------

    def mark_dirty(self, offset: int, length: int) -> None:
        """A change of ``[offset, offset+length)`` on the node (called by the node)."""
        self.bitmap.set(offset, length)

    def _start_recording(self) -> None:
        if self._disabled:
            self._disabled = False
            self.node.dirty_trackers.append(self)

    def _stop_recording(self) -> None:
        if not self._disabled:
            self._disabled = True
            self.node.dirty_trackers.remove(self)

    def _persist(self, *, shrink: bool = False, flags: bool = False) -> None:
        """Tell the bitmap store that a persistent bitmap changed outside the write path."""
        if not self.persistent or self.name is None:
            return
        store = bitmaps_of(self.node).store
        if store is not None:
            store.changed(self, shrink=shrink, flags=flags)

    def enable(self) -> None:
        """Record writes from now on (idempotent)."""
        was = self._disabled
        self._start_recording()
        if was:
            self._persist(flags=True)

    def disable(self) -> None:
        """Stop recording writes (idempotent)."""
        was = self._disabled
        self._stop_recording()
        if not was:
            self._persist(flags=True)

    def clear(self) -> None:
        self.bitmap.clear()
        self._persist(shrink=True)

    def runs(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Dirty runs, granule-aligned (what an NBD export shows as ``qemu:dirty-bitmap``)."""
        return self.bitmap.runs(offset, end)

    def sha256(self) -> str:
        """QEMU's ``x-debug-block-dirty-bitmap-sha256``: over the bits, padded to 64-bit words."""
        data = self.bitmap.to_bytes()
        data += bytes(-len(data) % 8)
        return hashlib.sha256(data).hexdigest()

    def merge_from(self, other: DirtyBitmap) -> None:
        """OR ``other`` into this bitmap (granularities may differ; rounding outward)."""
        if other.bitmap.size != self.bitmap.size:
            raise BlockBackupError("Bitmaps are incompatible and can't be merged")
        self.bitmap.merge(other.bitmap)
        self._persist()

    # -- successors (backup jobs) -------------------------------------------------------------

    def create_successor(self) -> DirtyBitmap:
        """Freeze this bitmap: an anonymous successor records from now on.

        Call at the backup's point in time (the node quiesced). The successor records iff
        this bitmap did.
        """
        if self.successor is not None:
            raise BlockBackupError("Cannot create a successor for a bitmap currently in-use")
        registry = bitmaps_of(self.node)
        successor = DirtyBitmap(
            self.node, None, self.granularity, persistent=False, disabled=self._disabled
        )
        self._stop_recording()
        self.successor = successor
        registry._append(successor)
        return successor

    def abdicate(self) -> DirtyBitmap:
        """The job's result is final: the successor takes over the name; this one goes.

        Returns the bitmap that now carries the name.
        """
        successor = self.successor
        if successor is None:
            raise ValueError(f"{self!r} has no successor")
        registry = bitmaps_of(self.node)
        successor.name = self.name
        successor.persistent = self.persistent
        successor.inconsistent = self.inconsistent
        successor.busy_flag = self.busy_flag
        self.successor = None
        registry._remove(self)
        successor._persist(shrink=True)
        return successor

    def reclaim(self) -> DirtyBitmap:
        """The job's result is dropped: merge the successor back; this one stays.

        Returns this bitmap, recording again iff the successor was recording.
        """
        successor = self.successor
        if successor is None:
            raise ValueError(f"{self!r} has no successor")
        self.bitmap.merge(successor.bitmap)
        recording = successor.enabled
        successor._stop_recording()
        bitmaps_of(self.node)._remove(successor)
        self.successor = None
        if recording:
            self._start_recording()
        return self

    # -- rendering ------------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        """One ``BlockDirtyInfo`` of ``query-named-block-nodes``."""
        out: dict[str, object] = {}
        if self.name is not None:
            out["name"] = self.name
        out.update(
            recording=self.recording,
            persistent=self.persistent,
            busy=self.busy,
            granularity=self.granularity,
            count=self.count,
        )
        if self.inconsistent:
            out["inconsistent"] = True
        return out


class BitmapRegistry:
    """The bitmaps of one node, oldest first (QEMU shows them newest first)."""

    def __init__(self, node: BlockNode) -> None:
        self._node = weakref.ref(node)
        self._all: list[DirtyBitmap] = []
        #: Where the persistent ones are stored (None: the node cannot store them).
        self.store: BitmapPersistence | None = None

    def __iter__(self) -> Iterator[DirtyBitmap]:
        return iter(list(self._all))

    def __len__(self) -> int:
        return len(self._all)

    def get(self, name: str) -> DirtyBitmap | None:
        """The named bitmap (never an anonymous successor)."""
        for bm in self._all:
            if bm.name == name:
                return bm
        return None

    def _append(self, bm: DirtyBitmap) -> None:
        self._all.append(bm)

    def _remove(self, bm: DirtyBitmap) -> None:
        if bm in self._all:
            self._all.remove(bm)

    def create(
        self,
        name: str,
        granularity: int | None = None,
        *,
        persistent: bool = False,
        disabled: bool = False,
    ) -> DirtyBitmap:
        """``block-dirty-bitmap-add`` after the argument checks: QEMU's texts."""
        node = self._node()
        assert node is not None
        if granularity is None:
            granularity = default_granularity(node)
        if granularity < _MIN_GRANULARITY or granularity & (granularity - 1):
            raise BlockBackupError("Granularity must be power of 2 and at least 512")
        store = None
        if persistent:
            store = self.store
            why = "Operation not supported" if store is None else store.can_store(granularity)
            if why is not None:
                raise BlockBackupError(f"Can't store persistent bitmaps to {node.name}: {why}")
        if self.get(name) is not None:
            raise BlockBackupError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise BlockBackupError(f"Bitmap name too long: {name}")
        bm = DirtyBitmap(node, name, granularity, persistent=persistent, disabled=disabled)
        self._all.append(bm)
        if store is not None:
            store.adopt(bm)
        return bm

    def release(self, bm: DirtyBitmap) -> None:
        """Forget ``bm`` (``block-dirty-bitmap-remove`` after the checks); a persistent
        bitmap leaves its storage too."""
        bm._stop_recording()
        self._remove(bm)
        if bm.persistent and bm.name is not None and self.store is not None:
            self.store.forget(bm.name)


class GraphBitmaps:
    """The bitmap registries of one graph's nodes (the graph's ``bitmaps``).

    Why per graph: the library and the tests run several graphs in one process; nodes of
    one must never find bitmaps (or their persistence) of another.
    """

    def __init__(self) -> None:
        self._registries: weakref.WeakKeyDictionary[BlockNode, BitmapRegistry] = (
            weakref.WeakKeyDictionary()
        )

    def registry(self, node: BlockNode) -> BitmapRegistry:
        """The node's registry (created empty on first use)."""
        registry = self._registries.get(node)
        if registry is None:
            registry = self._registries[node] = BitmapRegistry(node)
        return registry

    def find(self, node: BlockNode, name: str) -> DirtyBitmap | None:
        registry = self._registries.get(node)
        return registry.get(name) if registry is not None else None


def bitmaps_of(node: BlockNode) -> BitmapRegistry:
    """The node's bitmap registry, kept by its graph (created empty on first use)."""
    return node.graph.bitmaps.registry(node)


def find_bitmap(node: BlockNode, name: str) -> DirtyBitmap | None:
    """The named bitmap of ``node`` (the ExportManager's ``bitmap_lookup``)."""
    return node.graph.bitmaps.find(node, name)
