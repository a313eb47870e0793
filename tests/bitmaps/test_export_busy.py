"""Exported dirty bitmaps: QEMU 7.2's rules for enabled bitmaps and busy marking."""

from __future__ import annotations

import tempfile

import pytest

from blockbackup.block.dirty_bitmap import bitmaps_of, find_bitmap
from blockbackup.block.graph import Graph
from blockbackup.errors import BlockBackupError
from blockbackup.events import EventBus
from blockbackup.nbd.exports import ExportManager
from blockbackup.nbd.server import NbdServer

pytestmark = pytest.mark.asyncio


async def test_enabled_bitmap_plain_name_refused_node_name_form_busy() -> None:
    graph = Graph()
    node = await graph.add({"driver": "null-co", "node-name": "src", "size": 1 << 20})
    bitmaps_of(node).create("b0")
    exports = ExportManager(graph, EventBus(), bitmap_lookup=find_bitmap)
    server = NbdServer(exports)
    await server.start({"type": "unix", "path": f"{tempfile.mkdtemp(dir='/tmp')}/s"})
    try:
        with pytest.raises(
            BlockBackupError, match=r"^Enabled bitmap 'b0' incompatible with readonly export$"
        ):
            exports.add("e0", "src", bitmaps=["b0"])
        bitmap = find_bitmap(node, "b0")
        assert bitmap is not None
        assert not bitmap.busy
        exports.add("e1", "src", bitmaps=[{"node": "src", "name": "b0"}])  # correction 6
        assert bitmap.busy
        exports.delete("e1", "hard")
        assert not bitmap.busy
    finally:
        await server.stop()
        await graph.aclose()
