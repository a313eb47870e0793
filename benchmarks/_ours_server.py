"""Our NBD server in a child process, for benchmarks that compare it with qemu-storage-daemon.

One script for every benchmark: the image's format driver and the event loop are arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SERVER = r"""
import asyncio, sys
from blockbackup.block.graph import Graph
from blockbackup.events import EventBus
from blockbackup.nbd.exports import ExportManager
from blockbackup.nbd.server import NbdServer

async def main(image, sock, driver):
    graph = Graph()
    await graph.add({"driver": driver, "node-name": "r",
                     "file": {"driver": "file", "filename": image}})
    exports = ExportManager(graph, EventBus())
    server = NbdServer(exports)
    await server.start({"type": "unix", "path": sock})
    exports.add("e", "r", name="r", writable=True)
    print("ready", flush=True)
    await asyncio.Event().wait()

image, sock, driver, loop = sys.argv[1:5]
if loop == "uvloop":
    import uvloop
    uvloop.run(main(image, sock, driver))
else:
    asyncio.run(main(image, sock, driver))
"""


def server_argv(image: str, sock: str, driver: str = "raw", loop: str = "asyncio") -> list[str]:
    """The command line that serves ``image`` (format ``driver``) as export ``r`` on ``sock``."""
    return [sys.executable, "-c", SERVER, image, sock, driver, loop]


def wait_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait until a server process created its socket (or died)."""
    for _ in range(200):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        time.sleep(0.05)
    raise RuntimeError("server did not start")
