"""The server's fast READ/WRITE parse and reply paths agree with the full rules.

Why: ``ServerTransmission`` accepts common READ/WRITE requests with a few integer tests
instead of ``check_request``, builds their events without ``__post_init__`` and answers
them without reply events. Each shortcut must decide exactly what the slow path decides,
for every export shape and header, or a client gets a wrong errno or a bad reply.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockbackup.nbd.proto import (
    MAX_PAYLOAD,
    BlockSizeInfo,
    CmdFlag,
    InvalidRequest,
    LocalProtocolError,
    NegotiatedExport,
    OffsetData,
    Read,
    RemoteProtocolError,
    ReplyDone,
    SimpleReply,
    TxFlag,
    Write,
)
from blockbackup.nbd.proto.buffer import ReceiveBuffer
from blockbackup.nbd.proto.connection import DEFAULT_RECEIVE_CAP
from blockbackup.nbd.proto.constants import Magic
from blockbackup.nbd.proto.transmission import ServerTransmission, check_request
from blockbackup.nbd.proto.wire import REQUEST
from nbd.conftest import ConnectionPair, drain

SIZE = 1 << 20

exports = st.builds(
    lambda tx, structured, minimum, maximum, sized: NegotiatedExport(
        name="e",
        size=SIZE,
        transmission_flags=TxFlag(tx) | TxFlag.HAS_FLAGS,
        structured_replies=structured,
        block_sizes=BlockSizeInfo(
            minimum=minimum, preferred=max(minimum, 4096), maximum=maximum * minimum
        )
        if sized
        else None,
    ),
    st.integers(0, 0xFFF),
    st.booleans(),
    st.sampled_from([1, 512, 4096]),
    st.integers(1, 64),
    st.booleans(),
)


def _transmission(export: NegotiatedExport) -> tuple[ServerTransmission, ReceiveBuffer]:
    buf = ReceiveBuffer(DEFAULT_RECEIVE_CAP)
    return ServerTransmission(export, buf), buf


@settings(max_examples=400, deadline=None)
@given(
    export=exports,
    command=st.sampled_from([0, 1]),
    flags=st.integers(0, 0xFFFF) | st.integers(0, 31),
    offset=st.integers(0, SIZE + 8192) | st.sampled_from([0, 512, 4096, SIZE - 4096]),
    length=st.integers(0, 70000) | st.sampled_from([0, 1, 512, 4096, 65536]),
)
def test_parse_agrees_with_check_request(
    export: NegotiatedExport, command: int, flags: int, offset: int, length: int
) -> None:
    tx, buf = _transmission(export)
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256) if command == 1 else b""
    buf.feed(REQUEST.pack(Magic.REQUEST, flags, command, 7, offset, length) + payload)
    event = tx.next_event()
    problem = check_request(export, command, offset, length, flags)
    if problem is not None:
        assert isinstance(event, InvalidRequest)
        assert (event.error, event.reason) == problem
        return
    expected: Read | Write
    if command == 1:
        expected = Write(cookie=7, offset=offset, data=payload, flags=CmdFlag(flags))
    else:
        expected = Read(cookie=7, offset=offset, length=length, flags=CmdFlag(flags))
    assert event == expected
    assert type(event) is type(expected)
    assert isinstance(event.flags, CmdFlag)
    assert not buf


def _pending_read(
    structured: bool, offset: int = 4096, length: int = 512
) -> tuple[ServerTransmission, NegotiatedExport]:
    export = NegotiatedExport(
        name="e", size=SIZE, transmission_flags=TxFlag.HAS_FLAGS, structured_replies=structured
    )
    tx, buf = _transmission(export)
    buf.feed(REQUEST.pack(Magic.REQUEST, 0, 0, 9, offset, length))
    assert isinstance(tx.next_event(), Read)
    return tx, export


@pytest.mark.parametrize("structured", [False, True])
def test_reply_read_bytes_match_the_event_encoding(structured: bool) -> None:
    data = bytes(range(256)) * 2
    fast, _ = _pending_read(structured)
    slow, _ = _pending_read(structured)
    event = (
        OffsetData(cookie=9, offset=4096, data=data, done=True)
        if structured
        else SimpleReply(cookie=9, payload=data)
    )
    assert b"".join(fast.reply_read(9, 4096, data)) == b"".join(slow.send(event))
    assert fast.in_flight == slow.in_flight == 0


def test_reply_read_of_nothing_is_a_done_chunk() -> None:
    fast, _ = _pending_read(True, length=0)
    slow, _ = _pending_read(True, length=0)
    assert fast.reply_read(9, 4096, b"") == slow.send(ReplyDone(cookie=9))


@pytest.mark.parametrize(
    ("structured", "offset", "size"),
    [
        (False, 4096, 511),
        (False, 4096, 513),
        (True, 4096, 511),
        (True, 4096, 513),
        (True, 4608, 512),  # a simple reply carries no offset; a chunk must match
    ],
)
def test_reply_read_refuses_what_send_refuses(structured: bool, offset: int, size: int) -> None:
    tx, _ = _pending_read(structured)
    with pytest.raises(LocalProtocolError):
        tx.reply_read(9, offset, bytes(size))
    assert tx.in_flight == 1


def test_reply_ok_refuses_a_read_and_unknown_cookies() -> None:
    tx, _ = _pending_read(False)
    with pytest.raises(LocalProtocolError):
        tx.reply_ok(9)
    with pytest.raises(LocalProtocolError):
        tx.reply_ok(10)
    assert tx.in_flight == 1


def test_oversized_write_is_dropped_not_buffered() -> None:
    export = NegotiatedExport(name="e", size=SIZE, transmission_flags=TxFlag.HAS_FLAGS)
    tx, buf = _transmission(export)
    buf.feed(REQUEST.pack(Magic.REQUEST, 0, 1, 3, 0, MAX_PAYLOAD + 1))
    event = tx.next_event()
    assert isinstance(event, InvalidRequest)
    assert buf.skipping == MAX_PAYLOAD + 1


def _requests_stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    """Three WRITEs of different sizes (one larger than a sink starts) with a READ between."""
    payloads = [(1, bytes(range(256)) * 16), (3, os.urandom(1_500_000)), (4, b"\x01\x02" * 7)]
    out = b""
    for cookie, data in payloads[:1]:
        out += REQUEST.pack(Magic.REQUEST, 0, 1, cookie, 0, len(data)) + data
    out += REQUEST.pack(Magic.REQUEST, 0, 0, 2, 0, 4096)
    for cookie, data in payloads[1:]:
        out += REQUEST.pack(Magic.REQUEST, 0, 1, cookie, 8192, len(data)) + data
    return out, payloads


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 1_600_000), max_size=12),
    direct=st.lists(st.booleans(), min_size=1, max_size=12),
)
def test_payload_sink_any_cut_any_route(cuts: list[int], direct: list[bool]) -> None:
    """However bytes are cut, and whether they land via receive_data or straight in
    receive_view(), the same requests come out and nothing stays buffered."""
    pair = ConnectionPair()
    pair.handshake(structured=False, size=64 * 1024 * 1024)
    server = pair.server
    stream, payloads = _requests_stream()
    events = []
    pos, i = 0, 0
    bounds = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    for end in bounds:
        while pos < end:
            view = server.receive_view()
            if view is not None and direct[i % len(direct)]:
                n = min(len(view), end - pos)
                view[:n] = stream[pos : pos + n]
                server.received_into(n)
            else:
                n = end - pos if view is None else min(len(view), end - pos)
                server.receive_data(stream[pos : pos + n])
            pos += n
            i += 1
            events += drain(server)
    writes = [(e.cookie, bytes(e.data)) for e in events if isinstance(e, Write)]
    assert writes == payloads
    assert [e.cookie for e in events if isinstance(e, Read)] == [2]
    assert server.buffered == 0


def test_eof_inside_a_sink_payload_is_a_protocol_error() -> None:
    pair = ConnectionPair()
    pair.handshake(structured=False)
    server = pair.server
    server.receive_data(REQUEST.pack(Magic.REQUEST, 0, 1, 1, 0, 65536) + b"x" * 100)
    assert drain(server) == []
    view = server.receive_view()
    assert view is not None
    assert len(view) == 65536 - 100
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-message"):
        server.next_event()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_header_alone_does_not_commit_its_payload() -> None:
    """A peer sending only a maximal WRITE header must not cost MAX_PAYLOAD of memory."""
    pair = ConnectionPair()
    pair.handshake(structured=False, size=64 * 1024 * 1024)
    server = pair.server
    before = _rss()
    server.receive_data(REQUEST.pack(Magic.REQUEST, 0, 1, 1, 0, MAX_PAYLOAD) + b"z" * 4096)
    assert drain(server) == []
    view = server.receive_view()
    assert view is not None
    assert 0 < len(view) <= MAX_PAYLOAD - 4096
    assert _rss() - before < MAX_PAYLOAD // 4
    view[:4] = b"tail"  # the sink is writable where the socket will write
    server.received_into(4)
    view.release()


def test_sink_grows_even_while_an_old_view_is_held() -> None:
    pair = ConnectionPair()
    pair.handshake(structured=False, size=64 * 1024 * 1024)
    server = pair.server
    data = os.urandom(5 * 1024 * 1024 + 5)
    server.receive_data(REQUEST.pack(Magic.REQUEST, 0, 1, 1, 0, len(data)))
    assert drain(server) == []
    held = server.receive_view()  # kept alive: the sink cannot be resized in place
    assert held is not None
    pos = 0
    while pos < len(data):
        n = min(100_000, len(data) - pos)
        server.receive_data(data[pos : pos + n])
        pos += n
    (event,) = drain(server)
    assert isinstance(event, Write)
    assert bytes(event.data) == data
    held.release()
