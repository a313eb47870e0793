"""Hostile clients: malformed or abusive input ends that connection only.

Why: an export is a network service. After each abuse a second, well-behaved client must
still work and see the data intact, and the server must stay up. A Hypothesis fuzz sends
random and mutated byte streams at a live server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockbackup.nbd.client import NbdClient
from blockbackup.nbd.proto import Cmd, NbdErrno, Opt
from blockbackup.nbd.proto.constants import Magic
from nbd.nbd_kit import Env, MiB, server_env

pytestmark = [pytest.mark.timeout(60)]

PATTERN = os.urandom(64 * 1024)
REQ = struct.Struct(">IHHQQI")
OPT = struct.Struct(">QII")


async def _good_client_ok(env: Env, *, intact: bool = True, writable: bool = True) -> None:
    """Another client is served, its reads and writes work, and (``intact``) the data the
    bad input met is unchanged. A fuzzer on a writable export may send a well-formed
    write, which rightly changes data: there only the serving is checked."""
    client = await NbdClient.connect({"type": "unix", "path": env.sock}, "src", timeout=5)
    try:
        data = bytes(await client.read(0, len(PATTERN)))
        assert len(data) == len(PATTERN)
        if intact:
            assert data == PATTERN
        if writable:
            await client.write(MiB, b"ok" * 2048)
            assert bytes(await client.read(MiB, 4096)) == b"ok" * 2048
    finally:
        await client.close()


async def _prepare(env: Env) -> None:
    await env.node.write(0, PATTERN)


async def _handshake(
    env: Env, *, structured: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client in transmission on export ``src`` (simple replies)."""
    reader, writer = await env.raw_connect()
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3))
    name = b"src"
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    writer.write(OPT.pack(Magic.IHAVEOPT, Opt.GO, len(data)) + data)
    while True:  # replies: header (magic, option, type, length) + data
        head = await reader.readexactly(20)
        _, _, rtype, length = struct.unpack(">QIII", head)
        await reader.readexactly(length)
        if rtype == 1:  # ACK
            return reader, writer


async def _simple_reply(reader: asyncio.StreamReader) -> tuple[int, int]:
    magic, error, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
    assert magic == Magic.SIMPLE_REPLY
    return error, cookie


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    except (ConnectionError, TimeoutError):
        return True
    return True


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "payload",
    [
        b"garbage!" * 8,  # bad client flags then bad option magic
        struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8),
        struct.pack(">I", 3) + OPT.pack(Magic.IHAVEOPT, Opt.GO, 0xFFFFFFFF),  # huge option
        struct.pack(">I", 3) + OPT.pack(Magic.IHAVEOPT, Opt.GO, 100) + b"x" * 10,  # truncated
        struct.pack(">I", 3) + OPT.pack(Magic.IHAVEOPT, 0x99, 4) + b"abcd",  # unknown option
        struct.pack(">I", 0xFFFF),  # unknown client flags
        b"",
    ],
    ids=["garbage", "bad-opt-magic", "huge-option", "truncated", "unknown-opt", "flags", "empty"],
)
async def test_bad_handshakes(payload: bytes) -> None:
    async with server_env() as env:
        await _prepare(env)
        reader, writer = await env.raw_connect()
        await reader.readexactly(18)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        assert await _closed(reader)
        writer.close()
        await _good_client_ok(env)


@pytest.mark.asyncio
async def test_bad_requests_get_errnos() -> None:
    async with server_env() as env:
        await _prepare(env)
        reader, writer = await _handshake(env)
        size = 4 * MiB
        # Read beyond the end: EINVAL.
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.READ, 1, size - 512, 4096))
        assert await _simple_reply(reader) == (NbdErrno.EINVAL, 1)
        # Over 32 MiB: EINVAL (the payload of a write is skipped, never buffered).
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.READ, 2, 0, 64 * MiB))
        assert await _simple_reply(reader) == (NbdErrno.EINVAL, 2)
        # Unknown command and unknown flags.
        writer.write(REQ.pack(Magic.REQUEST, 0, 77, 3, 0, 512))
        assert await _simple_reply(reader) == (NbdErrno.EINVAL, 3)
        writer.write(REQ.pack(Magic.REQUEST, 0x8000, Cmd.READ, 4, 0, 512))
        assert await _simple_reply(reader) == (NbdErrno.EINVAL, 4)
        # Write beyond the end: ENOSPC (the spec's choice for writes).
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 5, size, 512) + bytes(512))
        assert await _simple_reply(reader) == (NbdErrno.ENOSPC, 5)
        # Still usable afterwards.
        writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.READ, 6, 0, 512))
        assert await _simple_reply(reader) == (0, 6)
        assert await reader.readexactly(512) == PATTERN[:512]
        # Bad request magic: the connection closes.
        writer.write(b"\x00" * 28)
        assert await _closed(reader)
        writer.close()
        await _good_client_ok(env)


@pytest.mark.asyncio
async def test_client_vanishing_mid_request() -> None:
    async with server_env() as env:
        await _prepare(env)
        for cut in (10, 28 + 1000):
            _reader, writer = await _handshake(env)
            msg = REQ.pack(Magic.REQUEST, 0, Cmd.WRITE, 9, 0, 65536) + b"\xee" * 65536
            writer.write(msg[:cut])
            await writer.drain()
            writer.transport.abort()
            await asyncio.sleep(0.05)
        # Many reads in flight, then vanish without reading the replies.
        _reader, writer = await _handshake(env)
        for cookie in range(200):
            writer.write(REQ.pack(Magic.REQUEST, 0, Cmd.READ, cookie, 0, 65536))
        await writer.drain()
        writer.transport.abort()
        await asyncio.sleep(0.1)
        await _good_client_ok(env)
        assert env.server.connections == 0


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _fuzz_once(stream: bytes, prefix: bool, writable: bool) -> None:
    errors = _Errors()
    logger = logging.getLogger("blockbackup.nbd")
    logger.addHandler(errors)
    try:
        await _fuzz_body(stream, prefix, writable)
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


async def _fuzz_body(stream: bytes, prefix: bool, writable: bool) -> None:
    async with server_env(2 * MiB, writable=writable) as env:
        await _prepare(env)
        if prefix:
            reader, writer = await _handshake(env)
        else:
            reader, writer = await env.raw_connect()
        writer.write(stream)
        try:
            await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        await _closed(reader)
        writer.close()
        # read-only: whatever the stream held, the data is intact
        await _good_client_ok(env, intact=not writable, writable=writable)


def _mutated_requests() -> st.SearchStrategy[bytes]:
    req = st.builds(
        REQ.pack,
        st.sampled_from([Magic.REQUEST, Magic.REQUEST, 0]),
        st.integers(0, 0xFFFF),
        st.integers(0, 10),
        st.integers(0, 2**64 - 1),
        st.one_of(st.integers(0, MiB), st.integers(0, 2**64 - 1)),
        st.one_of(st.integers(0, 70000), st.integers(0, 2**32 - 1)),
    )
    return st.lists(st.one_of(req, st.binary(max_size=64)), max_size=8).map(b"".join)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.one_of(
        st.tuples(st.binary(max_size=512), st.just(False)),
        st.tuples(_mutated_requests(), st.just(True)),
    ),
    st.booleans(),
)
# a well-formed WRITE_ZEROES: on a writable export it rightly zeroes byte 0 (found by this
# test once, when it still expected the data intact there); read-only, it is refused
@example((REQ.pack(Magic.REQUEST, 0, 6, 0, 0, 1), True), False)
@example((REQ.pack(Magic.REQUEST, 0, 6, 0, 0, 1), True), True)
def test_fuzz_live_server(case: tuple[bytes, bool], writable: bool) -> None:
    stream, prefix = case
    asyncio.run(_fuzz_once(stream, prefix, writable))
