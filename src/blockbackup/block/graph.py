"""The block graph: the registry of named nodes and the one way to create them.

``Graph.add`` takes a ``blockdev-add`` option dict, exactly as QMP and the command line
give it, for every node (nested definitions become implicit, auto-named children). The
errors it raises carry qemu-storage-daemon's texts.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping
from typing import Any

from blockbackup.block import drivers as _drivers  # noqa: F401  (registers the drivers)
from blockbackup.block.bitmap_store import BitmapStores
from blockbackup.block.dirty_bitmap import GraphBitmaps
from blockbackup.block.driver import DRIVERS
from blockbackup.block.node import BlockNode, NodeConfig
from blockbackup.block.objects import ObjectRegistry
from blockbackup.block.options import Options
from blockbackup.errors import BlockBackupError

log = logging.getLogger(__name__)

_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}\Z")


class CloseError(BlockBackupError):
    """Closing nodes failed: a final flush, storing bitmaps or a driver's close (which may
    have lost data). Raised once every node was closed anyway; names each failure."""


class Graph:
    """All nodes of one daemon (or one library user), by node-name, and the objects
    (``object-add``) its nodes refer to by id."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self.objects = ObjectRegistry()
        self._reserved: set[str] = set()
        self._auto_names = itertools.count()
        #: The dirty-bitmap registries of this graph's nodes, and their persistence.
        self.bitmaps = GraphBitmaps()
        self.bitmap_stores = BitmapStores()

    def find(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    def get(self, name: str) -> BlockNode:
        """The node called ``name``, or QEMU's "Cannot find device" error."""
        node = self.nodes.get(name)
        if node is None:
            raise BlockBackupError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def _auto_name(self) -> str:
        while True:
            name = f"#block{next(self._auto_names):03d}"
            if name not in self.nodes and name not in self._reserved:
                return name

    def _claim_name(self, opts: Options, implicit: bool) -> str:
        name: str | None = opts.str("node-name", None)
        if name is None:
            if not implicit:
                raise BlockBackupError("'node-name' must be specified for the root node")
            name = self._auto_name()
        elif not _NODE_NAME.match(name):
            raise BlockBackupError(f"Invalid node-name: '{name}'")
        if name in self.nodes or name in self._reserved:
            raise BlockBackupError(f"Duplicate nodes with node-name='{name}'")
        self._reserved.add(name)
        return name

    @staticmethod
    def _common_config(opts: Options, options: Mapping[str, Any]) -> NodeConfig:
        read_only = opts.bool("read-only", False)
        opts.bool("auto-read-only", False)
        force_share = opts.bool("force-share", False)
        if force_share and not read_only:
            raise BlockBackupError("force-share=on can only be used with read-only images")
        discard = opts.enum("discard", ("ignore", "unmap", "off", "on"), "ignore")
        detect_zeroes = opts.enum("detect-zeroes", ("off", "on", "unmap"), "off")
        cache = opts.sub("cache", None)
        direct = no_flush = False
        if cache is not None:
            direct = cache.bool("direct", False)
            no_flush = cache.bool("no-flush", False)
            cache.finish()
        return NodeConfig(
            read_only=read_only,
            discard_unmap=discard in ("unmap", "on"),
            cache_direct=direct,
            no_flush=no_flush,
            detect_zeroes=detect_zeroes,
            force_share=force_share,
            options=dict(options),
        )

    async def add(
        self, options: Mapping[str, Any], *, prefix: str = "", implicit: bool = False
    ) -> BlockNode:
        """Create a node (and its nested children) from blockdev-add options."""
        opts = Options(self, options, prefix)
        driver_name = opts.str("driver")
        driver_cls = DRIVERS.get(driver_name)
        if driver_cls is None:
            raise BlockBackupError(
                f"Parameter 'driver' does not accept value '{driver_name}'"  # QAPI: bare key
            )
        name = self._claim_name(opts, implicit)
        node: BlockNode | None = None
        try:
            node = BlockNode(self, name, self._common_config(opts, options), implicit=implicit)
            opts.children_read_only = node.read_only
            opts.children_force_share = node.config.force_share
            driver = await driver_cls.open(node, opts)
            node.set_driver(driver)
            try:
                opts.finish()
            except BaseException:
                await driver.close()
                raise
        except BaseException:
            if node is not None:
                # The open's error is what the caller gets; a child failing to close
                # as well is logged (by _close), not raised over it.
                await self._release_children(node, [])
            raise
        finally:
            self._reserved.discard(name)
        self.nodes[name] = node
        await self.bitmap_stores.node_opened(node)  # persistent dirty bitmaps
        return node

    async def delete(self, name: str) -> None:
        """blockdev-del: close a node nobody uses, with its implicit children.

        :raise CloseError: storing its bitmaps or closing a driver failed (the node and
            its implicit children are gone anyway).
        """
        node = self.nodes.get(name)
        if node is None:
            raise BlockBackupError(f"Failed to find node with node-name='{name}'")
        for description in node.users.values():
            if description.startswith("block job"):
                raise BlockBackupError(
                    f"Node '{name}' is busy: block device is in use by {description}"
                )
        if node.users:
            raise BlockBackupError(f"Node {name} is in use")
        if node.parents:
            raise BlockBackupError(f"Block device {name} is in use")
        failed: list[str] = []
        await self._close(node, failed)
        _raise_failures(failed)

    async def drop(self, node: BlockNode) -> None:
        """Close a node its owner created for itself (a job's filter), users or not.

        :raise CloseError: as :meth:`delete`.
        """
        node.users.clear()
        failed: list[str] = []
        await self._close(node, failed)
        _raise_failures(failed)

    async def _close(self, node: BlockNode, failed: list[str]) -> None:
        """Close ``node`` and its implicit children that nobody else uses.

        Every step is taken whatever an earlier one raised, so that every driver gets
        its ``close`` (its file descriptors and locks released): an ``OSError`` is logged
        and appended to ``failed`` (the node's name and the reason) for the caller to
        report once all is closed. Anything else (a bug, a cancellation) still runs the
        remaining steps, then propagates.
        """
        await node.wait_idle()
        self.nodes.pop(node.name, None)
        try:
            try:
                # Stores the persistent bitmaps (clean close).
                await self.bitmap_stores.node_closing(node)
            except OSError as exc:
                _record(failed, node, "store the bitmaps of", exc)
            finally:
                try:
                    await node.driver.close()
                except OSError as exc:
                    _record(failed, node, "close", exc)
        finally:
            # Whatever the driver's close raised, the node is gone: its children must not
            # keep it as a parent (they could never be deleted, and the graph would look
            # cyclic at shutdown).
            await self._release_children(node, failed)

    async def _release_children(self, node: BlockNode, failed: list[str]) -> None:
        errors: list[BaseException] = []
        for child in node.detach_children():
            if child.implicit and not child.parents and not child.users:
                try:
                    await self._close(child, failed)
                except BaseException as exc:  # the other children are closed first
                    errors.append(exc)
        if errors:
            raise errors[0]

    async def aclose(self) -> None:
        """Flush and close every node, parents before children.

        A failed final flush means data the node acknowledged may not be on stable
        storage, so it is never swallowed: it is logged with the node's name, the other
        nodes are still flushed and closed, and :class:`CloseError` names every node
        that failed once all are closed (the daemon then exits non-zero). A failed close
        (a format writing its metadata, the bitmaps being stored) is reported the same
        way, and the rest is closed all the same.
        """
        failed: list[str] = []
        while self.nodes:
            roots = [n for n in self.nodes.values() if not n.parents]
            if not roots:  # pragma: no cover - the graph is acyclic by construction
                raise RuntimeError("cycle in block graph")
            for node in roots:
                if not node.read_only:
                    try:
                        await node.flush()
                    except OSError as exc:
                        _record(failed, node, "flush", exc)
                node.users.clear()
                await self._close(node, failed)
        self.objects.close()
        _raise_failures(failed)


def _record(failed: list[str], node: BlockNode, what: str, exc: OSError) -> None:
    """Log a failure of closing ``node`` and add it to ``failed``."""
    reason = exc.strerror or str(exc)
    log.error("Failed to %s node '%s' at close: %s", what, node.name, reason)
    failed.append(f"Failed to {what} '{node.name}' ({reason})")


def _raise_failures(failed: list[str]) -> None:
    if failed:
        raise CloseError("; ".join(failed) + " at close")
