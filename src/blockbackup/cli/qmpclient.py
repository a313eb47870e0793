"""What every QMP-client subcommand shares: short connections, error reporting, Ctrl-C.

The commands are plain QMP clients (QEMU's own ``qemu.qmp``): they work against blockbackup
and against qemu-storage-daemon alike.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


async def connect(socket: str) -> QMPClient:
    client = QMPClient("blockbackup")
    await client.connect(socket)
    return client


class ExecuteErrorLike(Exception):
    """A failure before or around a QMP command, reported like the command's own error."""


async def qmp(socket: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    """Run commands on a short connection: a monitor serves one client at a time, so the
    backup command never holds it longer than a query (``jobs`` keeps working meanwhile)."""
    client = await connect(socket)
    try:
        return [await client.execute(name, args) for name, args in commands]
    finally:
        await client.disconnect()


class suppress_execute_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ExecuteError | ConnectionError | EOFError)


def run_interruptible(coro: Any) -> int:
    """Run ``coro``; Ctrl-C cancels it (the backup then cancels its job) and exits 130."""

    async def main() -> int:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return int(await task)
        except asyncio.CancelledError:
            return EXIT_INTERRUPTED

    return asyncio.run(main())
