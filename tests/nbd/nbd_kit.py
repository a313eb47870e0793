"""Helpers for the live-server tests: an in-process NBD server on a short unix socket.

Why: every server/client test needs the same set-up (an image, a graph with a ``src`` node,
an export manager, a started server) and the same way to run external tools without
blocking the event loop the server lives on.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockbackup.block.graph import Graph
from blockbackup.block.node import BlockNode
from blockbackup.events import EventBus
from blockbackup.nbd.exports import BitmapLookup, ExportManager
from blockbackup.nbd.server import NbdServer

MiB = 1 << 20


def need(*tools: str) -> pytest.MarkDecorator:
    """Skip unless every tool is installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


async def run_tool(
    *argv: str, timeout: float = 60, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run a program without blocking the loop; return (rc, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def check_tool(*argv: str, timeout: float = 60) -> str:
    rc, out, err = await run_tool(*argv, timeout=timeout)
    assert rc == 0, f"{argv} failed ({rc}): {out}\n{err}"
    return out


@dataclass
class Env:
    """One running server with an image-backed node ``src``."""

    dir: Path
    image: Path
    sock: str
    graph: Graph
    events: EventBus
    exports: ExportManager
    server: NbdServer
    node: BlockNode

    def uri(self, name: str = "src") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    async def raw_connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.sock)


@asynccontextmanager
async def server_env(
    size: int = 4 * MiB,
    *,
    writable: bool = True,
    bitmap_lookup: BitmapLookup | None = None,
    export: bool = True,
    node_opts: dict[str, Any] | None = None,
    **start: Any,
) -> AsyncIterator[Env]:
    """A server on a unix socket in a short /tmp directory, exporting ``src``."""
    d = Path(tempfile.mkdtemp(prefix="bbnbd", dir="/tmp"))
    try:
        image = d / "src.img"
        with open(image, "wb") as f:
            f.truncate(size)
        graph = Graph()
        events = EventBus()
        node = await graph.add(
            node_opts
            or {
                "driver": "raw",
                "node-name": "src",
                "file": {"driver": "file", "filename": str(image)},
            }
        )
        exports = ExportManager(graph, events, bitmap_lookup=bitmap_lookup)
        server = NbdServer(exports)
        sock = str(d / "s")
        await server.start({"type": "unix", "path": sock}, **start)
        if export:
            exports.add("e", node.name, name="src", writable=writable)
        env = Env(d, image, sock, graph, events, exports, server, node)
        try:
            yield env
        finally:
            if server.running:
                await server.stop()
            await graph.aclose()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
