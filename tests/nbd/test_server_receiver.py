"""The transmission receiver over real sockets: splits, pipelining, disconnects, backpressure.

Why: in transmission the server receives through a ``BufferedProtocol`` that writes
WRITE payloads straight into their final buffer. Whatever way the bytes are cut into
socket reads, a request must be parsed the same; a payload cut short must never reach
the disk; bytes the client sent together with the handshake must not be lost when the
receiver takes over; and a client that stops reading replies must not make the server
buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

import pytest

from blockbackup.nbd.proto import Cmd, Opt
from blockbackup.nbd.proto.constants import Magic
from blockbackup.nbd.receiver import PAUSE_BYTES, SCRATCH_BYTES
from nbd.nbd_kit import Env, MiB, server_env

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

REQ = struct.Struct(">IHHQQI")
OPT = struct.Struct(">QII")
REPLY = struct.Struct(">IIQ")


def _go() -> bytes:
    name = b"src"
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    return struct.pack(">I", 3) + OPT.pack(Magic.IHAVEOPT, Opt.GO, len(data)) + data


async def _finish_handshake(reader: asyncio.StreamReader) -> None:
    await reader.readexactly(18)
    while True:
        _, _, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if rtype == 1:  # ACK
            return


async def _connect(env: Env) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await env.raw_connect()
    writer.write(_go())
    await _finish_handshake(reader)
    return reader, writer


async def _reply(reader: asyncio.StreamReader, cookie: int, payload: int = 0) -> bytes:
    magic, error, got = REPLY.unpack(await reader.readexactly(REPLY.size))
    assert (magic, error, got) == (Magic.SIMPLE_REPLY, 0, cookie)
    return await reader.readexactly(payload)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _send_in_pieces(writer: asyncio.StreamWriter, data: bytes, sizes: list[int]) -> None:
    """Send ``data`` cut at ``sizes`` (cycled), pausing so each piece is its own read."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        writer.write(data[pos : pos + n])
        await writer.drain()
        await asyncio.sleep(0.002)
        pos += n
        i += 1


async def test_write_payload_split_across_many_reads() -> None:
    async with server_env() as env:
        reader, writer = await _connect(env)
        data = os.urandom(256 * 1024)
        msg = REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 1, 4096, len(data)) + data
        await _send_in_pieces(writer, msg, [1, 27, 3, 4096, 1000, 65536, 7])
        await _reply(reader, 1)
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.READ, 2, 4096, len(data)))
        assert await _reply(reader, 2, len(data)) == data
        assert bytes(await env.node.read(4096, len(data))) == data
        await _close(writer)


async def test_request_header_split_at_every_byte() -> None:
    async with server_env() as env:
        reader, writer = await _connect(env)
        for cut in range(1, REQ.size):
            data = bytes([cut]) * 512
            msg = REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, cut, cut * 512, 512) + data
            await _send_in_pieces(writer, msg, [cut, len(msg)])
            await _reply(reader, cut)
            read = REQ.pack(Magic.REQUEST, 0, Cmd.READ, 1000 + cut, cut * 512, 512)
            await _send_in_pieces(writer, read, [cut, REQ.size])
            assert await _reply(reader, 1000 + cut, 512) == data
        await _close(writer)


async def test_disconnect_mid_payload_writes_nothing() -> None:
    async with server_env() as env:
        before = os.urandom(MiB)
        await env.node.write(0, before)
        for cut in (REQ.size, REQ.size + 1, REQ.size + 300 * 1024, REQ.size + MiB - 1):
            _reader, writer = await _connect(env)
            msg = REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 7, 0, MiB) + b"\xee" * MiB
            await _send_in_pieces(writer, msg[:cut], [64 * 1024])
            writer.transport.abort()
            await _close(writer)
            for _ in range(100):
                if not env.server.connections:
                    break
                await asyncio.sleep(0.01)
            assert env.server.connections == 0
        assert bytes(await env.node.read(0, MiB)) == before
        # The server still serves others.
        reader, writer = await _connect(env)
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.READ, 1, 0, 4096))
        assert await _reply(reader, 1, 4096) == before[:4096]
        await _close(writer)


async def test_requests_sent_with_the_handshake_are_served() -> None:
    async with server_env() as env:
        known = os.urandom(4096)
        await env.node.write(MiB, known)
        reader, writer = await env.raw_connect()
        data = os.urandom(3 * 65536)
        requests = REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 1, 0, len(data)) + data
        requests += REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 2, 2 * MiB, 512) + data[:512]
        requests += REQ.pack(Magic.REQUEST, 0, Cmd.READ, 3, MiB, len(known))
        writer.write(_go() + requests)  # all at once, before the server answered anything
        await _finish_handshake(reader)
        got = {}
        for _ in range(3):  # replies may come in any order
            magic, error, cookie = REPLY.unpack(await reader.readexactly(REPLY.size))
            assert (magic, error) == (Magic.SIMPLE_REPLY, 0)
            got[cookie] = await reader.readexactly(len(known) if cookie == 3 else 0)
        assert got == {1: b"", 2: b"", 3: known}
        assert bytes(await env.node.read(0, len(data))) == data
        assert bytes(await env.node.read(2 * MiB, 512)) == data[:512]
        await _close(writer)


async def test_client_not_reading_replies_bounds_server_buffering() -> None:
    async with server_env(16 * MiB) as env:
        reader, writer = await _connect(env)
        count, size = 200, 64 * 1024
        async with env.node.quiesced():  # requests in flight block: the server must stop
            for cookie in range(count):
                writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, cookie, cookie * size, size))
                writer.write(bytes([cookie % 251]) * size)
            await asyncio.sleep(0.5)
            (client,) = list(env.server._clients)
            buffered = client.conn.receive_buffer.high_water
            assert buffered <= PAUSE_BYTES + SCRATCH_BYTES
            assert writer.transport.get_write_buffer_size() > 0  # the server stopped reading
        done = set()
        for _ in range(count):  # in any order: blocked requests finish after later ones
            magic, error, cookie = REPLY.unpack(await reader.readexactly(REPLY.size))
            assert (magic, error) == (Magic.SIMPLE_REPLY, 0)
            done.add(cookie)
        assert done == set(range(count))
        assert bytes(await env.node.read(5 * size, size)) == bytes([5]) * size
        await _close(writer)
