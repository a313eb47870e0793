"""The differential tests' connect retry survives a daemon that drops the first session.

qemu-storage-daemon has been seen (in CI) to close the connection right after answering
the first capabilities negotiation after startup: qemu.qmp's connect then fails its own
state assertion, and its disconnect re-raises the closed connection's EOFError; and to
reset the next session at its first command. The retry must connect again rather than
fail the test with any of them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from compat.compat_kit import _connect

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}


async def test_connect_retries_after_a_dropped_negotiation(tmp_path: Path) -> None:
    """Session 1 ends right after the negotiation, session 2 at its first command (both
    seen in CI against qemu-storage-daemon); session 3 is the one the test gets."""
    sock = tmp_path / "qmp.sock"
    sessions = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sessions
        sessions += 1
        session = sessions
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        await writer.drain()
        request = json.loads(await reader.read(4096))  # qemu.qmp sends no newline
        assert request["execute"] == "qmp_capabilities"
        writer.write(b'{"return": {}}\r\n')
        await writer.drain()
        if session > 1:
            while data := await reader.read(4096):
                if session == 2:
                    break  # hangs up at the first command
                request = json.loads(data)
                reply = {"return": {"qemu": {}, "package": ""}, "id": request["id"]}
                writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(sock))
    async with server:
        async with asyncio.timeout(10):
            client = await _connect("fake", sock)
        assert sessions == 3
        assert await client.execute("query-version") == {"qemu": {}, "package": ""}
        await client.disconnect()
