"""READs the server answers without a task keep the read path's guarantees.

Why: a READ whose data is in the page cache (``BlockNode.read_now``: raw over file, a
``RWF_NOWAIT`` copy) is answered from the request loop. It must return the right bytes
(export end, raw ``offset``/``size`` windows), leave uncached data, errors and holes to
the task path (an errno, hole chunks for sparse structured READs), keep the server's
buffering bounded for a client that does not read its replies, and see every WRITE
completed before it on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockbackup.block.drivers.file import FileDriver
from blockbackup.block.node import BlockNode
from blockbackup.nbd.proto import Cmd, CmdFlag, NbdErrno, Opt
from blockbackup.nbd.proto.constants import Magic, ReplyType
from blockbackup.nbd.server import FLUSH_BYTES
from nbd.nbd_kit import Env, MiB, server_env

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

REQ = struct.Struct(">IHHQQI")
OPT = struct.Struct(">QII")
REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
SIZE = 4 * MiB


async def _connect(
    env: Env, *, structured: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await env.raw_connect()
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3))
    if structured:
        writer.write(OPT.pack(Magic.IHAVEOPT, Opt.STRUCTURED_REPLY, 0))
    name = b"src"
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    writer.write(OPT.pack(Magic.IHAVEOPT, Opt.GO, len(data)) + data)
    acks = 2 if structured else 1
    while acks:
        _, _, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        acks -= rtype == 1
    return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def _read(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQ.pack(Magic.REQUEST, flags, Cmd.READ, cookie, offset, length)


async def _simple(reader: asyncio.StreamReader, length: int) -> tuple[int, int, bytes]:
    """(error, cookie, payload) of one simple reply; a READ's payload only without error."""
    magic, error, cookie = REPLY.unpack(await reader.readexactly(REPLY.size))
    assert magic == Magic.SIMPLE_REPLY
    return error, cookie, b"" if error else await reader.readexactly(length)


async def _chunks(reader: asyncio.StreamReader) -> list[tuple[int, int, bytes]]:
    """(type, offset, data) of every chunk of one structured reply, up to DONE."""
    out = []
    while True:
        magic, flags, rtype, _, length = CHUNK.unpack(await reader.readexactly(CHUNK.size))
        assert magic == Magic.STRUCTURED_REPLY
        payload = await reader.readexactly(length)
        if rtype == ReplyType.OFFSET_DATA:
            out.append((rtype, struct.unpack(">Q", payload[:8])[0], payload[8:]))
        elif rtype == ReplyType.OFFSET_HOLE:
            offset, n = struct.unpack(">QI", payload)
            out.append((rtype, offset, bytes(n)))
        else:
            out.append((rtype, 0, payload))
        if flags & 1:
            return out


def _count(monkeypatch: pytest.MonkeyPatch, node: BlockNode, *names: str) -> dict[str, int]:
    """Count calls to the node's awaited methods (the task path; ``_read_awaited`` is
    the awaited part of ``submit_read``, which every awaited read goes through)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        method: Callable[..., Awaitable[Any]] = getattr(node, name)

        async def counted(*args: Any, _m: Any = method, _n: str = name) -> Any:
            calls[_n] += 1
            return await _m(*args)

        monkeypatch.setattr(node, name, counted)
    return calls


@contextlib.asynccontextmanager
async def _env_with_data(**kw: Any) -> AsyncIterator[tuple[Env, bytes]]:
    async with server_env(SIZE, **kw) as env:
        data = os.urandom(SIZE)
        with open(env.image, "r+b") as f:  # buffered: the data is in the page cache
            f.write(data)
        yield env, data


async def test_cached_reads_are_inline_and_right(monkeypatch: pytest.MonkeyPatch) -> None:
    async with _env_with_data() as (env, data):
        calls = _count(monkeypatch, env.node, "_read_awaited", "block_status")
        reader, writer = await _connect(env)
        ranges = [(0, 4096), (SIZE - 4096, 4096), (SIZE - MiB, MiB), (12345, 777), (SIZE - 1, 1)]
        for cookie, (offset, length) in enumerate(ranges):
            writer.write(_read(cookie, offset, length))
        for cookie, (offset, length) in enumerate(ranges):
            assert await _simple(reader, length) == (0, cookie, data[offset : offset + length])
        assert calls == {"_read_awaited": 0, "block_status": 0}  # all answered from the loop
        # Past the end: refused by the protocol layer, the connection goes on.
        writer.write(_read(9, SIZE - 4096, 8192))
        assert (await _simple(reader, 0))[:2] == (NbdErrno.EINVAL, 9)
        writer.write(_read(10, 0, 512))
        assert await _simple(reader, 512) == (0, 10, data[:512])
        await _close(writer)


async def test_raw_window_reads_inline_inside_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with server_env(SIZE, export=False) as env:
        data = os.urandom(SIZE)
        env.image.write_bytes(data)
        start, size = 12345, MiB + 3
        node = await env.graph.add(
            {
                "driver": "raw",
                "node-name": "win",
                "offset": start,
                "size": size,
                "file": {"driver": "file", "node-name": "wf", "filename": str(env.image)},
            }
        )
        env.exports.add("w", "win", name="src", writable=False)
        calls = _count(monkeypatch, node, "_read_awaited", "block_status")
        window = data[start : start + size]
        reader, writer = await _connect(env, structured=True)
        for cookie, (offset, length) in enumerate([(0, MiB), (size - MiB, MiB), (size - 3, 3)]):
            writer.write(_read(cookie, offset, length))
            chunks = await _chunks(reader)
            assert chunks == [(ReplyType.OFFSET_DATA, offset, window[offset : offset + length])]
        assert calls == {"_read_awaited": 0, "block_status": 0}
        writer.write(_read(7, size - 3, 4))  # one byte past the window: never read
        ((rtype, _, _),) = await _chunks(reader)
        assert rtype == ReplyType.ERROR
        await _close(writer)


async def test_sparse_structured_reads_still_send_holes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with server_env(SIZE) as env:
        data = os.urandom(256 * 1024)
        with open(env.image, "r+b") as f:
            f.write(data)  # then a hole up to the end of the file
        await env.node.read(0, MiB)  # every page of the range in the page cache
        file_node = env.node.driver.child  # type: ignore[attr-defined]
        assert file_node.read_now(0, MiB) is not None  # so the loop could answer it
        calls = _count(monkeypatch, env.node, "_read_awaited", "block_status")
        reader, writer = await _connect(env, structured=True)
        writer.write(_read(1, 0, MiB))
        chunks = await _chunks(reader)
        assert [(t, o, len(d)) for t, o, d in chunks] == [
            (ReplyType.OFFSET_DATA, 0, len(data)),
            (ReplyType.OFFSET_HOLE, len(data), MiB - len(data)),
        ]
        assert chunks[0][2] == data
        assert calls["block_status"] > 0
        # With DF the client wants one data chunk: served from the loop, zeroes included.
        before = dict(calls)
        writer.write(_read(2, 0, MiB, CmdFlag.DF))
        assert await _chunks(reader) == [(ReplyType.OFFSET_DATA, 0, data + bytes(MiB - len(data)))]
        assert calls == before
        await _close(writer)


@pytest.mark.parametrize("cached", [0, 4096], ids=["none", "partly"])
async def test_uncached_reads_fall_back_to_the_pool(
    monkeypatch: pytest.MonkeyPatch, cached: int
) -> None:
    """The kernel's ``EAGAIN`` (nothing or only a part cached) is simulated: evicting
    pages is not deterministic (``RWF_NOWAIT`` misses start readahead)."""
    async with _env_with_data() as (env, data):
        real = os.preadv
        nowait = []

        def preadv(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
            if flags & os.RWF_NOWAIT:
                nowait.append(offset)
                if len(nowait) == 1 and cached:
                    return real(fd, [memoryview(buffers[0])[:cached]], offset, flags)
                raise BlockingIOError(11, "not cached")
            return real(fd, buffers, offset, flags)

        monkeypatch.setattr(os, "preadv", preadv)
        calls = _count(monkeypatch, env.node, "_read_awaited")
        reader, writer = await _connect(env)
        writer.write(_read(1, MiB, MiB))
        assert await _simple(reader, MiB) == (0, 1, data[MiB : 2 * MiB])
        assert calls == {"_read_awaited": 1}
        assert nowait[0] == MiB
        await _close(writer)


async def test_read_error_is_that_requests_errno() -> None:
    async with _env_with_data() as (env, data):
        driver = env.node.driver.child.driver  # type: ignore[attr-defined]
        assert isinstance(driver, FileDriver)
        good_fd = driver.fd
        bad_fd = os.open(env.image, os.O_WRONLY)
        reader, writer = await _connect(env)
        try:
            driver.fd = bad_fd  # preadv now fails with EBADF, inline and in the pool
            writer.write(_read(1, 0, 4096))
            assert await _simple(reader, 4096) == (NbdErrno.EIO, 1, b"")
        finally:
            driver.fd = good_fd
            os.close(bad_fd)
        writer.write(_read(2, 4096, 4096))
        assert await _simple(reader, 4096) == (0, 2, data[4096:8192])
        await _close(writer)


async def test_blkdebug_read_error_under_raw(tmp_path: Path) -> None:
    async with server_env(SIZE, export=False) as env:
        data = os.urandom(SIZE)
        env.image.write_bytes(data)
        node = await env.graph.add(
            {
                "driver": "raw",
                "node-name": "dbgraw",
                "file": {
                    "driver": "blkdebug",
                    "node-name": "dbg",
                    "image": {"driver": "file", "node-name": "df", "filename": str(env.image)},
                },
            }
        )
        assert node.read_now(0, 4096) is None  # blkdebug has no read_now: the task path
        env.exports.add("d", "dbgraw", name="src", writable=False)
        dbg = env.graph.get("dbg").driver  # type: ignore[attr-defined]
        rule = dbg.add_rule("read", 5, offset=MiB, length=4096)
        reader, writer = await _connect(env)
        writer.write(_read(1, MiB, 4096) + _read(2, 0, 4096))
        replies = {(await _simple(reader, 4096))[:2] for _ in range(2)}
        assert replies == {(NbdErrno.EIO, 1), (0, 2)}
        dbg.remove_rule(rule)
        writer.write(_read(3, MiB, 4096))
        assert await _simple(reader, 4096) == (0, 3, data[MiB : MiB + 4096])
        await _close(writer)


async def test_client_not_reading_inline_replies_bounds_buffering() -> None:
    async with _env_with_data() as (env, data):
        reader, writer = await _connect(env)
        count = 96  # 96 MiB of replies
        for cookie in range(count):
            writer.write(_read(cookie, (cookie % 4) * MiB, MiB))
        await writer.drain()
        await asyncio.sleep(0.5)
        (client,) = list(env.server._clients)
        queued = client.writer.transport.get_write_buffer_size() + client._out_bytes
        # What the kernel does not take stays queued: at most about one reply over the
        # drain threshold, never the 96 MiB asked for.
        assert queued <= FLUSH_BYTES + 2 * MiB, queued
        for cookie in range(count):
            offset = (cookie % 4) * MiB
            assert await _simple(reader, MiB) == (0, cookie, data[offset : offset + MiB])
        await _close(writer)


async def test_reads_see_completed_writes_on_the_same_connection() -> None:
    async with _env_with_data() as (env, data):
        model = bytearray(data)
        rng = random.Random(7)
        reader, writer = await _connect(env)
        cookie = 0
        for _ in range(60):
            # One WRITE (inline when small, in the pool when large), waited for ...
            length = rng.choice([512, 4096, 64 * 1024, MiB])
            offset = rng.randrange(0, SIZE - length)
            payload = os.urandom(length)
            cookie += 1
            writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, cookie, offset, length) + payload)
            assert await _simple(reader, 0) == (0, cookie, b"")
            model[offset : offset + length] = payload
            # ... then pipelined READs of it and around it, answered in any order.
            reads = {}
            for roff, rlen in [(offset, length), (max(0, offset - 4096), min(length, 8192))]:
                cookie += 1
                reads[cookie] = (roff, rlen)
                writer.write(_read(cookie, roff, rlen))
            for _ in reads:
                magic, error, got = REPLY.unpack(await reader.readexactly(REPLY.size))
                assert (magic, error) == (Magic.SIMPLE_REPLY, 0)
                roff, rlen = reads[got]
                assert await reader.readexactly(rlen) == model[roff : roff + rlen]
        await _close(writer)
