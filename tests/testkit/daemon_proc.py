"""``blockbackup daemon`` as a subprocess with a ``qemu.qmp`` client: what a user runs.

Why a subprocess: only a real process shows what a person sees at shutdown (a traceback on
stderr, the exit code) and holds its fds the way a daemon does.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

OURS = [sys.executable, "-m", "blockbackup", "daemon"]


@dataclass
class DaemonProcess:
    """A running daemon: its QMP client, the events seen, and (after exit) its stderr."""

    proc: asyncio.subprocess.Process
    client: QMPClient
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    exit_code: int | None = None
    _new_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(name, args)

    async def event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first event ``name`` (since start) whose data has ``match``; consumed."""
        async with asyncio.timeout(timeout):
            while True:
                for i, ev in enumerate(self.events):
                    data = ev.get("data", {})
                    if ev["event"] == name and all(data.get(k) == v for k, v in match.items()):
                        del self.events[i]
                        return ev
                self._new_event.clear()
                await self._new_event.wait()

    async def _collect(self) -> None:
        async for event in self.client.events:
            self.events.append(dict(event))
            self._new_event.set()


def monitor_args(sock: Path) -> list[str]:
    return ["--chardev", f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "m0"]


@contextlib.asynccontextmanager
async def daemon_process(directory: Path, args: Sequence[str]) -> AsyncIterator[DaemonProcess]:
    """Start the daemon with ``args`` plus a monitor in ``directory``; ``quit`` it at the end
    (its stderr and exit code are then on the yielded object)."""
    sock = directory / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        *OURS,
        *args,
        *monitor_args(sock),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=directory,
    )
    try:
        client = QMPClient("test")
        async with asyncio.timeout(30):
            while True:
                if proc.returncode is not None:
                    err = await proc.stderr.read() if proc.stderr else b""
                    raise RuntimeError(f"daemon exited at startup: {err.decode()}")
                if sock.exists():
                    try:
                        await client.connect(str(sock))
                        break
                    except ConnectError:
                        pass
                await asyncio.sleep(0.02)  # poll: the socket appears when it listens
        d = DaemonProcess(proc, client)
        collector = asyncio.create_task(d._collect())
        try:
            yield d
            with contextlib.suppress(Exception):
                await client.execute("quit")
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
            d.stderr = err.decode(errors="replace")
            d.exit_code = proc.returncode
        finally:
            collector.cancel()
            with contextlib.suppress(BaseException):
                await collector
            with contextlib.suppress(Exception):
                await client.disconnect()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
