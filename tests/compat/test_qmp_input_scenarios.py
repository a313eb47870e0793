"""Differential scenarios for hostile QMP input (issue 12, fault 6).

qemu-storage-daemon 7.2 and blockbackup get the same bytes on a raw monitor socket and
must give the same replies: QEMU's parse errors for values it refuses, a float for an
integer too large for 64 bits, and its nesting limit, after which both keep serving the
session. The 64 MiB message limit is not compared here: qemu-storage-daemon 7.2 reads such
a string at about 200 KiB/s (minutes); ``tests/qmp/test_input_limits.py`` checks ours.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from compat.compat_kit import MiB, Recorder, assert_same, compare, env_ok

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.asyncio,
    pytest.mark.skipif(not env_ok(), reason="qemu-storage-daemon / qemu-img not installed"),
    pytest.mark.timeout(120),
]

SYNC = b'{"execute": "query-jobs", "id": "sync"}'
INPUTS = [
    b'{"execute": "query-jobs", "id": ["\\u00"]}',
    b'{"execute": "query-jobs", "id": "\\ud800"}',
    b'{"execute": "query-jobs", "id": "\\ud800\\u0041"}',
    b'{"execute": "query-jobs", "id": "\\udc00"}',
    b'{"execute": "query-jobs", "id": "\\uffff"}',
    b'{"execute": "query-jobs", "id": "\\ud83d\\ude00\\u00e9"}',
    b'{"execute": "query-jobs", "id": 1, "id": 2}',
    b"{tru: 1}",
    b'{{"a": 1}: 1}',
    b'{"execute": "block-job-set-speed", "arguments": {"device": "j", "speed": '
    + b"9" * 100_000
    + b"}}",
    b'{"execute": "query-jobs", "id": 18446744073709551615}',
    b'{"execute": "query-jobs", "id": ' + b"[" * 1025 + b"]" * 1025 + b"}",
]


class _Monitor:
    """A raw connection on the recorder's monitor (its qemu.qmp client let go)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> Any:
        async with asyncio.timeout(60):
            return json.loads(await self.reader.readline())

    async def until_sync(self) -> list[Any]:
        out = []
        while (msg := await self.recv()).get("id") != "sync":
            out.append(msg)
        return out


async def _open(r: Recorder) -> _Monitor:
    await r.client.disconnect()
    reader, writer = await asyncio.open_unix_connection(str(r.dir / "qmp.sock"), limit=MiB)
    mon = _Monitor(reader, writer)
    await mon.recv()
    await mon.send(b'{"execute": "qmp_capabilities"}')
    await mon.recv()
    return mon


async def test_refused_values(tmp_path: Path) -> None:
    async def scenario(r: Recorder) -> None:
        mon = await _open(r)
        for data in INPUTS:
            await mon.send(data + SYNC)
            r.note([data[:60].decode(), await mon.until_sync()])
        mon.writer.close()
        r.proc.terminate()

    ref, ours = await compare(tmp_path, scenario, quit_at_end=False)
    assert_same(ref, ours)
