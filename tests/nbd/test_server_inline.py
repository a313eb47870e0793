"""WRITEs the server serves without a task keep the request layer's guarantees.

Why: a WRITE the block layer can finish at once (``BlockNode.write_now``: a page-cache
``pwrite``) is answered from the request loop. It must still mark dirty bitmaps, wait
while the node is quiesced (a backup taking its point in time), and turn an I/O error
into an errno for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

import pytest

from blockbackup.nbd.proto import Cmd, NbdErrno, Opt
from blockbackup.nbd.proto.constants import Magic
from nbd.nbd_kit import Env, MiB, server_env

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

REQ = struct.Struct(">IHHQQI")
OPT = struct.Struct(">QII")
REPLY = struct.Struct(">IIQ")


async def _connect(env: Env) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await env.raw_connect()
    name = b"src"
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    writer.write(struct.pack(">I", 3) + OPT.pack(Magic.IHAVEOPT, Opt.GO, len(data)) + data)
    await reader.readexactly(18)
    while True:
        _, _, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if rtype == 1:
            return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _reply(reader: asyncio.StreamReader) -> tuple[int, int]:
    magic, error, cookie = REPLY.unpack(await reader.readexactly(REPLY.size))
    assert magic == Magic.SIMPLE_REPLY
    return error, cookie


class _Recorder:
    def __init__(self) -> None:
        self.marks: list[tuple[int, int]] = []

    def mark_dirty(self, offset: int, length: int) -> None:
        self.marks.append((offset, length))


async def test_inline_writes_mark_dirty_trackers() -> None:
    async with server_env() as env:
        recorder = _Recorder()
        env.node.dirty_trackers.append(recorder)
        reader, writer = await _connect(env)
        data = os.urandom(4096)
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 1, 8192, len(data)) + data)
        assert await _reply(reader) == (0, 1)
        assert (8192, 4096) in recorder.marks
        assert bytes(await env.node.read(8192, 4096)) == data
        await _close(writer)


async def test_write_waits_while_the_node_is_quiesced() -> None:
    async with server_env() as env:
        reader, writer = await _connect(env)
        data = b"\x77" * 4096
        async with env.node.quiesced():
            writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 1, 0, len(data)) + data)
            await writer.drain()
            await asyncio.sleep(0.2)
            with open(env.image, "rb") as f:
                assert f.read(4096) == bytes(4096)  # nothing written inside the section
            assert not reader._buffer  # type: ignore[attr-defined]  # and no reply yet
        assert await _reply(reader) == (0, 1)
        assert bytes(await env.node.read(0, 4096)) == data
        await _close(writer)


async def test_inline_write_error_is_that_requests_errno() -> None:
    async with server_env() as env:
        file_driver = env.node.driver.child.driver  # type: ignore[attr-defined]
        good_fd = file_driver.fd
        bad_fd = os.open(env.image, os.O_RDONLY)
        reader, writer = await _connect(env)
        try:
            file_driver.fd = bad_fd  # pwrite now fails with EBADF
            writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 1, 0, 512) + b"x" * 512)
            assert await _reply(reader) == (NbdErrno.EIO, 1)
        finally:
            file_driver.fd = good_fd
            os.close(bad_fd)
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 2, MiB, 512) + b"y" * 512)
        assert await _reply(reader) == (0, 2)
        assert bytes(await env.node.read(MiB, 512)) == b"y" * 512
        await _close(writer)
