"""An in-process daemon and a raw monitor connection, for tests of the QMP layer.

Why in-process: the test and the daemon share one event loop, so a test can observe
what the daemon does between two turns of the loop, and the daemon is the same
:class:`~blockbackup.daemon.Daemon` the ``blockbackup daemon`` command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from blockbackup.daemon import Daemon
from blockbackup.daemon_options import parse_args


@contextlib.asynccontextmanager
async def running_daemon(tmp: Path, *extra: str) -> AsyncIterator[tuple[Daemon, Path]]:
    (tmp / "src.img").write_bytes(bytes(1 << 20))
    sock = tmp / "qmp.sock"
    argv = [
        "--blockdev",
        f"driver=file,node-name=srcf,filename={tmp}/src.img",
        "--blockdev",
        "driver=raw,node-name=src,file=srcf",
        "--chardev",
        f"socket,id=m0,path={sock},server=on,wait=off",
        "--monitor",
        "chardev=m0",
        *extra,
    ]
    daemon = Daemon()
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(parse_args(argv).options, on_ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        raise RuntimeError(f"daemon exited with {task.result()}")
    try:
        yield daemon, sock
    finally:
        daemon.request_shutdown()
        assert await task == 0


class Raw:
    """A raw monitor connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path, negotiate: bool = True) -> Raw:
        reader, writer = await asyncio.open_unix_connection(str(path))
        raw = cls(reader, writer)
        greeting = await raw.recv()
        assert greeting["QMP"]["version"]["qemu"] == {"micro": 22, "minor": 2, "major": 7}
        assert greeting["QMP"]["capabilities"] == ["oob"]
        if negotiate:
            await raw.send(b'{"execute": "qmp_capabilities"}')
            assert await raw.recv() == {"return": {}}
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), 10)
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    async def error(self, data: bytes) -> str:
        await self.send(data)
        reply = await self.recv()
        return str(reply["error"]["desc"])

    def close(self) -> None:
        self.writer.close()
