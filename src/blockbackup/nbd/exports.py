"""Block exports: which nodes the NBD server shows, under which names, and their lifetime.

Why: the QMP commands ``block-export-add``, ``block-export-del`` and ``query-block-exports``
map one to one onto :class:`ExportManager`, and the NBD server only ever asks it "which
export is called X". Keeping the registry apart from the sockets lets the rules (QEMU's
error texts, node users, ``safe``/``hard`` removal and ``BLOCK_EXPORT_DELETED``) be tested
without a network.

Lifetime of an export (as observed on qemu-storage-daemon 7.2):

* ``add`` registers it and makes it a user of its node (so ``blockdev-del`` refuses);
* ``delete(mode="safe")`` fails with ``export 'ID' still in use`` while a client is in the
  transmission phase; otherwise the export goes away at once;
* ``delete(mode="hard")`` marks it ``shutting-down``, hides its name from new clients and
  disconnects the connected ones; when the last one is gone the export is dropped and
  ``BLOCK_EXPORT_DELETED {id}`` is emitted (immediately when nobody was connected);
* stopping the NBD server removes every export the hard way.

Everything runs on the event loop that owns the graph.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from blockbackup.block.permissions import ALL, Perm, Use
from blockbackup.errors import BlockBackupError
from blockbackup.nbd.proto import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    TxFlag,
)
from blockbackup.nbd.proto.constants import MAX_STRING

if TYPE_CHECKING:
    from blockbackup.block.graph import Graph
    from blockbackup.block.node import BlockNode
    from blockbackup.events import EventBus

__all__ = [
    "BitmapLookup",
    "ExportBitmap",
    "ExportClient",
    "ExportManager",
    "NbdExport",
]

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class ExportBitmap(Protocol):
    """What an export needs from a dirty bitmap: its dirty runs (``Bitmap.runs``)."""

    def runs(self, offset: int = 0, end: int | None = None) -> Iterable[tuple[int, int]]: ...


#: ``lookup(node, bitmap_name)`` -> the bitmap, or None when the node has no such bitmap.
BitmapLookup = Callable[["BlockNode", str], ExportBitmap | None]


class ExportClient(Protocol):
    """A connection in the transmission phase of an export; ``abort`` drops it."""

    def abort(self) -> None: ...


class NbdExport:
    """One export: a node shown under a name, with its options and connected clients."""

    def __init__(
        self,
        *,
        id: str,
        node: BlockNode,
        name: str,
        description: str,
        writable: bool,
        bitmaps: Mapping[str, ExportBitmap],
        allocation_depth: bool,
    ) -> None:
        self.id = id
        self.node = node
        self.name = name
        self.description = description
        self.writable = writable
        #: bitmap name -> bitmap, exposed as ``qemu:dirty-bitmap:NAME``.
        self.bitmaps = dict(bitmaps)
        self.allocation_depth = allocation_depth
        self.clients: set[ExportClient] = set()
        self.shutting_down = False
        self._deleted = asyncio.Event()
        contexts = [CONTEXT_BASE_ALLOCATION]
        if allocation_depth:
            contexts.append(CONTEXT_QEMU_ALLOCATION_DEPTH)
        contexts += [CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + b for b in self.bitmaps]
        #: meta context name -> the id the server gives it on this export.
        self.contexts: dict[str, int] = {c: i for i, c in enumerate(contexts)}

    def __repr__(self) -> str:
        return f"<NbdExport {self.id!r} name={self.name!r} node={self.node.name!r}>"

    def retarget(self, node: BlockNode) -> None:
        """Serve ``node`` from now on (the graph moved us onto a filter inserted above
        our node, or back: :meth:`BlockNode.move_users`)."""
        self.node = node

    @property
    def use(self) -> Use:
        """What the export takes on its node, as QEMU's NBD export does: consistent
        reads, writes if writable, and nobody may resize the node under its clients."""
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else Perm.NONE)
        return Use(perm, ALL & ~Perm.RESIZE)

    @property
    def size(self) -> int:
        return self.node.size

    def transmission_flags(self, structured: bool) -> TxFlag:
        """The flags a client of this export sees (``structured``: replies negotiated)."""
        flags = (
            TxFlag.HAS_FLAGS
            | TxFlag.SEND_FLUSH
            | TxFlag.SEND_FUA
            | TxFlag.SEND_CACHE
            | TxFlag.CAN_MULTI_CONN
        )
        if structured:
            flags |= TxFlag.SEND_DF
        if self.writable:
            flags |= TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO
        else:
            flags |= TxFlag.READ_ONLY
        return flags

    def match_contexts(self, queries: Sequence[str], *, listing: bool) -> list[tuple[str, int]]:
        """The contexts selected by ``queries`` (``listing``: NBD_OPT_LIST_META_CONTEXT).

        When listing, no query means every context and a query ending in ``:`` (``base:``,
        ``qemu:``, ``qemu:dirty-bitmap:``) is a prefix; when setting, names must match.
        """
        if listing and not queries:
            return list(self.contexts.items())
        out: dict[str, int] = {}
        for query in queries:
            for name, cid in self.contexts.items():
                prefix = listing and query.endswith(":") and name.startswith(query)
                if name == query or prefix:
                    out[name] = cid
        return list(out.items())

    async def wait_deleted(self) -> None:
        """Wait until the export is gone (``BLOCK_EXPORT_DELETED`` was emitted)."""
        await self._deleted.wait()


class ExportManager:
    """The registry behind ``block-export-add``/``-del`` and ``query-block-exports``.

    :param graph: where ``node-name`` is looked up.
    :param events: receives ``BLOCK_EXPORT_DELETED``.
    :param bitmap_lookup: finds a dirty bitmap by node and name for the ``bitmaps`` option;
        without it, every bitmap is "not found".
    """

    def __init__(
        self,
        graph: Graph,
        events: EventBus,
        *,
        bitmap_lookup: BitmapLookup | None = None,
    ) -> None:
        self.graph = graph
        self.events = events
        self.bitmap_lookup = bitmap_lookup
        self._by_id: dict[str, NbdExport] = {}
        self._by_name: dict[str, NbdExport] = {}
        #: Set by the NBD server while it runs ("NBD server not running" otherwise).
        self.server_running = False

    # -- QMP commands ----------------------------------------------------------------------

    def add(
        self,
        id: str,
        node_name: str,
        *,
        type: str = "nbd",
        writable: bool = False,
        writethrough: bool = False,
        name: str | None = None,
        description: str | None = None,
        bitmaps: Sequence[str | Mapping[str, Any]] | None = None,
        allocation_depth: bool = False,
    ) -> NbdExport:
        """``block-export-add``: export node ``node_name`` as ``name`` (default: the node name).

        :raise BlockBackupError: with QEMU's texts.
        """
        if type != "nbd":
            raise BlockBackupError(f"Parameter 'type' does not accept value '{type}'")
        if not _ID.match(id):
            raise BlockBackupError("Invalid block export id")
        if id in self._by_id:
            raise BlockBackupError(f"Block export id '{id}' is already in use")
        node = self.graph.get(node_name)
        if not self.server_running:
            raise BlockBackupError("NBD server not running")
        if name is None:
            name = node_name
        if len(name.encode()) > MAX_STRING:
            raise BlockBackupError(f"export name '{name}' too long")
        if description is not None and len(description.encode()) > MAX_STRING:
            raise BlockBackupError(f"description '{description}' too long")
        if name in self._by_name:
            raise BlockBackupError(f"NBD server already has export named '{name}'")
        if writable and node.read_only:
            raise BlockBackupError("Block node is read-only")
        if writable:
            node.check_new_writer()
        found: dict[str, ExportBitmap] = {}
        for ref in bitmaps or ():
            bm_node, bm_name = self._bitmap_ref(node, ref)
            found_on, bitmap = self._find_bitmap(bm_node, bm_name, below=isinstance(ref, str))
            if bitmap is None:
                if isinstance(ref, str):
                    raise BlockBackupError(f"Bitmap '{bm_name}' is not found")
                raise BlockBackupError(f"Dirty bitmap '{bm_name}' not found")
            # QEMU's bdrv_dirty_bitmap_check: not while busy (another export, a job) or
            # inconsistent.
            check_usable = getattr(bitmap, "check_usable", None)
            if check_usable is not None:
                check_usable()
            # QEMU 7.2 refuses an enabled bitmap only when named plainly; the {node, name}
            # form is accepted (and makes the bitmap busy) -- reference, correction 6.
            # Whether it can still change is a question about the node that holds it.
            plain = isinstance(ref, str)
            enabled = getattr(bitmap, "enabled", False)
            if plain and not writable and enabled and not found_on.read_only:
                raise BlockBackupError(
                    f"Enabled bitmap '{bm_name}' incompatible with readonly export"
                )
            found[bm_name] = bitmap
        export = NbdExport(
            id=id,
            node=node,
            name=name,
            description=description or "",
            writable=writable,
            bitmaps=found,
            allocation_depth=allocation_depth,
        )
        node.add_user(export, "export")  # may refuse: another user's permissions
        for bitmap in found.values():
            if hasattr(bitmap, "busy_flag"):
                bitmap.busy_flag = True
        self._by_id[id] = export
        self._by_name[name] = export
        return export

    def _find_bitmap(
        self, node: BlockNode, name: str, *, below: bool
    ) -> tuple[BlockNode, ExportBitmap | None]:
        """The bitmap ``name`` on ``node`` or, when ``below``, the first one found going
        down its filtered or backing children, and the node that holds it.

        Why below: QEMU's ``nbd_export_create`` walks ``bdrv_filter_or_cow_bs`` for a bitmap
        named plainly, and pull-mode backups depend on it: the export is a fleecing overlay
        whose backing is the disk that holds the checkpoint bitmap.
        """
        at: BlockNode | None = node
        while at is not None:
            bitmap = self.bitmap_lookup(at, name) if self.bitmap_lookup else None
            if bitmap is not None or not below:
                return at, bitmap
            driver = at.driver
            role = driver.filtered_role if driver.is_filter else "backing"
            at = at.children.get(role)
        return node, None

    def _bitmap_ref(self, node: BlockNode, ref: str | Mapping[str, Any]) -> tuple[BlockNode, str]:
        if isinstance(ref, str):
            return node, ref
        # QEMU's block_dirty_bitmap_lookup, with its texts.
        bm_node = self.graph.find(str(ref["node"]))
        if bm_node is None:
            raise BlockBackupError(f"Node '{ref['node']}' not found")
        return bm_node, str(ref["name"])

    def delete(self, id: str, mode: str = "safe") -> None:
        """``block-export-del``: remove an export (``safe`` refuses while clients use it).

        Returns at once; ``BLOCK_EXPORT_DELETED`` follows when the export is gone.
        """
        export = self._by_id.get(id)
        if export is None:
            raise BlockBackupError(f"Export '{id}' is not found")
        if mode not in ("safe", "hard"):
            raise BlockBackupError(f"Parameter 'mode' does not accept value '{mode}'")
        if export.shutting_down:
            raise BlockBackupError(f"Export '{id}' is already shutting down")
        if mode == "safe" and export.clients:
            raise BlockBackupError(f"export '{id}' still in use")
        self._shutdown(export)

    def query(self) -> list[dict[str, Any]]:
        """``query-block-exports``."""
        return [
            {
                "id": e.id,
                "type": "nbd",
                "node-name": e.node.name,
                "shutting-down": e.shutting_down,
            }
            for e in self._by_id.values()
        ]

    # -- for the server --------------------------------------------------------------------

    def get(self, id: str) -> NbdExport | None:
        return self._by_id.get(id)

    def lookup(self, name: str) -> NbdExport | None:
        """The live export a client may open under ``name``."""
        return self._by_name.get(name)

    def visible(self) -> list[NbdExport]:
        """Exports NBD_OPT_LIST shows."""
        return list(self._by_name.values())

    def attach(self, export: NbdExport, client: ExportClient) -> bool:
        """A client entered transmission; False if the export is going away."""
        if export.shutting_down or self._by_id.get(export.id) is not export:
            return False
        export.clients.add(client)
        return True

    def detach(self, export: NbdExport, client: ExportClient) -> None:
        """A client of ``export`` is gone."""
        export.clients.discard(client)
        if export.shutting_down and not export.clients:
            self._finish(export)

    def close_all(self) -> None:
        """Remove every export the hard way (``nbd-server-stop``)."""
        for export in list(self._by_id.values()):
            if not export.shutting_down:
                self._shutdown(export)

    def _shutdown(self, export: NbdExport) -> None:
        export.shutting_down = True
        if self._by_name.get(export.name) is export:
            del self._by_name[export.name]
        if not export.clients:
            self._finish(export)
            return
        for client in list(export.clients):
            client.abort()

    def _finish(self, export: NbdExport) -> None:
        if self._by_id.get(export.id) is not export:
            return
        del self._by_id[export.id]
        export.node.remove_user(export)
        for bitmap in export.bitmaps.values():
            if hasattr(bitmap, "busy_flag"):
                bitmap.busy_flag = False
        export._deleted.set()
        self.events.emit("BLOCK_EXPORT_DELETED", {"id": export.id})
