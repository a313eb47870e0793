"""Round trips through an in-memory client/server pair, plus named bad inputs.

Why: proves both roles agree on the wire for every command, in both reply
styles, and that each class of bad input gets the answer the spec asks for.
"""

from __future__ import annotations

import struct

import pytest

from blockbackup.nbd.proto import (
    MAX_PAYLOAD,
    NEED_DATA,
    BlockSizeInfo,
    BlockStatus,
    BlockStatusChunk,
    ClientConnection,
    Cmd,
    CmdFlag,
    ConnectionClosed,
    ConnectionState,
    Disconnect,
    ErrorChunk,
    Extent,
    Flush,
    InvalidRequest,
    LocalProtocolError,
    NbdErrno,
    OffsetData,
    OffsetHole,
    OptAbort,
    OptionAck,
    OptionError,
    OptList,
    OptStartTls,
    Read,
    RemoteProtocolError,
    Rep,
    ReplyDone,
    RequestDone,
    ServerConnection,
    ServerGreeting,
    ServerListEntry,
    SimpleReply,
    TlsUpgrade,
    Trim,
    TxFlag,
    UnknownOption,
    Write,
    WriteZeroes,
)
from blockbackup.nbd.proto.constants import Magic, Opt
from blockbackup.nbd.proto.events import Cache

REQ = struct.Struct(">IHHQQI")


def raw_request(cmd: int, offset: int, length: int, *, flags: int = 0, cookie: int = 99) -> bytes:
    return REQ.pack(Magic.REQUEST, flags, cmd, cookie, offset, length)


def test_handshake_negotiates_contexts(pair):
    neg = pair.handshake()
    assert neg.structured_replies
    assert dict(neg.meta_contexts) == {7: "base:allocation", 8: "qemu:dirty-bitmap:b0"}
    assert neg.context_id("qemu:dirty-bitmap:b0") == 8
    assert pair.client.state is ConnectionState.TRANSMISSION
    assert pair.server.state is ConnectionState.TRANSMISSION


def test_structured_read_out_of_order_chunks(pair):
    pair.handshake()
    cookie, parts = pair.client.read(4096, 8192)
    (req,) = pair.raw_c(pair.join(parts))
    assert req == Read(cookie=cookie, offset=4096, length=8192)
    payload = memoryview(b"x" * 4096)
    out = pair.server.send(OffsetData(cookie=cookie, offset=8192, data=payload))
    assert out[1] is payload  # passthrough, no copy
    # The data chunk is serialized first but reaches the client after the hole.
    hole = pair.join(pair.server.send(OffsetHole(cookie=cookie, offset=4096, length=4096)))
    done_bytes = pair.join(pair.server.send(ReplyDone(cookie=cookie)))
    pair.client.receive_data(hole + pair.join(out) + done_bytes)
    got = pair.drain(pair.client)
    assert isinstance(got[0], OffsetHole)
    assert isinstance(got[1], OffsetData)
    assert got[2] == ReplyDone(cookie=cookie)
    done = got[3]
    assert isinstance(done, RequestDone)
    assert done.error is None
    assert bytes(done.data) == bytes(4096) + b"x" * 4096


def test_interleaved_replies_of_two_requests(pair):
    pair.handshake()
    c1, p1 = pair.client.read(0, 512)
    c2, p2 = pair.client.write(512, b"w" * 512, CmdFlag.FUA)
    evs = pair.raw_c(pair.join(p1) + pair.join(p2))
    assert [type(e) for e in evs] == [Read, Write]
    assert evs[1].data == b"w" * 512
    got = pair.s(SimpleReply(cookie=c2))
    assert got == [SimpleReply(cookie=c2), RequestDone(cookie=c2, command=Cmd.WRITE)]
    got = pair.s(OffsetData(cookie=c1, offset=0, data=b"r" * 512, done=True))
    assert bytes(got[-1].data) == b"r" * 512


def test_all_simple_commands(pair):
    pair.handshake()
    for make in (
        lambda: pair.client.flush(),
        lambda: pair.client.trim(0, 4096),
        lambda: pair.client.write_zeroes(0, 4096, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
        lambda: pair.client.cache(0, 4096),
    ):
        cookie, parts = make()
        (req,) = pair.raw_c(pair.join(parts))
        assert req.cookie == cookie
        assert isinstance(req, Flush | Trim | WriteZeroes | Cache)
        pair.client.receive_data(pair.join(pair.server.send_error(cookie, NbdErrno.ENOSPC, "full")))
        done = pair.drain(pair.client)
        assert isinstance(done[-1], RequestDone)
        assert done[-1].error is NbdErrno.ENOSPC
        assert done[-1].message == "full"


def test_block_status_two_contexts(pair):
    pair.handshake()
    cookie, parts = pair.client.block_status(0, 65536)
    (req,) = pair.raw_c(pair.join(parts))
    assert req == BlockStatus(cookie=cookie, offset=0, length=65536)
    a = BlockStatusChunk(cookie=cookie, context_id=8, extents=(Extent(65536, 1),))
    b = BlockStatusChunk(
        cookie=cookie, context_id=7, extents=(Extent(4096, 0), Extent(61440, 3)), done=True
    )
    got = pair.s(a, b)
    assert got[:2] == [a, b]
    assert got[2].extents == {8: ((65536, 1),), 7: ((4096, 0), (61440, 3))}


def test_block_status_missing_context_is_refused_locally(pair):
    pair.handshake()
    cookie, parts = pair.client.block_status(0, 4096)
    pair.raw_c(pair.join(parts))
    chunk = BlockStatusChunk(cookie=cookie, context_id=7, extents=((4096, 0),), done=True)
    with pytest.raises(LocalProtocolError):
        pair.server.send(chunk)


def test_simple_replies_without_structured(pair):
    neg = pair.handshake(structured=False)
    assert not neg.structured_replies
    assert not neg.meta_contexts
    cookie, parts = pair.client.read(0, 4)
    pair.raw_c(pair.join(parts))
    with pytest.raises(LocalProtocolError):
        pair.server.send(OffsetData(cookie=cookie, offset=0, data=b"abcd", done=True))


def test_simple_read_reply(pair):
    pair.handshake(structured=False)
    target = bytearray(4)
    cookie, parts = pair.client.read(0, 4, into=target)
    pair.raw_c(pair.join(parts))
    got = pair.s(SimpleReply(cookie=cookie, payload=b"abcd"))
    assert got[0] == SimpleReply(cookie=cookie, payload=b"abcd")
    assert target == b"abcd"
    # Block status needs contexts: the client refuses to send it.
    with pytest.raises(LocalProtocolError):
        pair.client.block_status(0, 4)


def test_export_name_path_and_no_zeroes(make_pair):
    pair = make_pair()
    neg = pair.handshake(export_name=True, structured=False)
    assert neg.name == "disk"
    assert neg.size == pair.EXPORT_SIZE
    # With NO_ZEROES negotiated the EXPORT_NAME answer is 10 bytes.
    assert len(pair.log[-1][1]) == 10


def test_read_error_structured_then_disconnect(pair):
    pair.handshake()
    cookie, parts = pair.client.read(0, 4096)
    pair.raw_c(pair.join(parts))
    got = pair.s(
        ErrorChunk(cookie=cookie, error=NbdErrno.EIO, message="bad", offset=512, done=True)
    )
    assert got[-1].error is NbdErrno.EIO
    assert got[-1].error_offset == 512
    assert got[-1].data is None
    assert pair.c(Disconnect()) == [Disconnect()]
    assert pair.server.state is ConnectionState.CLOSED
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ConnectionClosed()


def test_option_list_unknown_and_abort(pair):
    pair.greet()
    assert pair.c(OptList()) == [OptList()]
    entry = ServerListEntry(name="disk", description="a disk")
    assert pair.s(entry, OptionAck()) == [entry, OptionAck()]
    unknown = UnknownOption(option=4242, data=b"??")
    assert pair.c(unknown) == [unknown]
    data = pair.join(pair.server.reject_option())
    pair.client.receive_data(data)
    assert pair.drain(pair.client) == [OptionError(code=Rep.ERR_UNSUP)]
    assert pair.c(OptAbort()) == [OptAbort()]
    assert pair.s(OptionAck()) == [OptionAck()]
    assert pair.client.state is ConnectionState.CLOSED


def test_starttls_upgrade_point(pair):
    pair.greet()
    assert pair.c(OptStartTls()) == [OptStartTls()]
    assert pair.s(OptionAck()) == [TlsUpgrade()]
    assert pair.server.next_event() == TlsUpgrade()
    assert pair.server.next_event() is NEED_DATA
    assert pair.server.state is ConnectionState.TLS_UPGRADE
    with pytest.raises(LocalProtocolError):
        pair.server.receive_data(b"\x16\x03\x01")  # raw TLS must not reach the parser
    pair.server.tls_established()
    pair.client.tls_established()
    assert pair.server.state is ConnectionState.HANDSHAKE
    # Negotiation continues on the (now decrypted) stream.
    assert pair.c(OptList()) == [OptList()]
    assert pair.s(OptionAck()) == [OptionAck()]
    with pytest.raises(LocalProtocolError):
        pair.client.send(OptStartTls())  # TLS twice is refused locally


def test_starttls_injection_refused(pair):
    pair.greet()
    opt = pair.join(pair.client.send(OptStartTls()))
    pair.server.receive_data(opt + b"injected")
    with pytest.raises(RemoteProtocolError):
        pair.drain(pair.server)


# ------------------------------------------------------------ bad inputs


def fresh_server() -> ServerConnection:
    server = ServerConnection()
    server.send(ServerGreeting())
    return server


def test_bad_garbage_greeting_magic():
    client = ClientConnection()
    client.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.state is ConnectionState.ERROR


def test_bad_oldstyle_refused():
    client = ClientConnection()
    client.receive_data(struct.pack(">QQH", Magic.NBDMAGIC, Magic.CLISERV, 0))
    with pytest.raises(RemoteProtocolError, match="oldstyle"):
        client.next_event()


def test_bad_non_fixed_newstyle_refused():
    client = ClientConnection()
    client.receive_data(struct.pack(">QQH", Magic.NBDMAGIC, Magic.IHAVEOPT, 0))
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        client.next_event()
    server = fresh_server()
    server.receive_data(struct.pack(">I", 0))
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        server.next_event()


def test_bad_garbage_option_magic():
    server = fresh_server()
    server.receive_data(struct.pack(">I", 3) + b"GARBAGE!" + bytes(8))
    assert [type(e).__name__ for e in [server.next_event()]] == ["ClientFlags"]
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.next_event()


def test_bad_truncated_handshake():
    server = fresh_server()
    server.receive_data(struct.pack(">I", 3) + struct.pack(">QII", Magic.IHAVEOPT, Opt.GO, 20))
    server.next_event()
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-message"):
        server.next_event()


def test_bad_option_with_huge_length_not_buffered():
    server = fresh_server()
    server.receive_data(struct.pack(">I", 3) + struct.pack(">QII", Magic.IHAVEOPT, Opt.GO, 2**31))
    server.next_event()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()
    assert server.buffered < 64


def test_bad_malformed_go_gets_invalid_option(pair):
    pair.greet()
    (ev,) = pair.raw_c(struct.pack(">QII", Magic.IHAVEOPT, Opt.GO, 3) + b"abc")
    assert type(ev).__name__ == "InvalidOption"
    out = pair.join(pair.server.reject_option(Rep.ERR_INVALID, "bad"))
    assert out.endswith(b"bad")


def _ready(pair, **kw) -> None:
    pair.handshake(**kw)


def test_bad_request_beyond_export_size(pair):
    _ready(pair)
    (ev,) = pair.raw_c(raw_request(Cmd.READ, pair.EXPORT_SIZE - 512, 1024))
    assert isinstance(ev, InvalidRequest)
    assert ev.error is NbdErrno.EINVAL
    (ev,) = pair.raw_c(raw_request(Cmd.WRITE, pair.EXPORT_SIZE, 4, cookie=5) + b"abcd")
    assert isinstance(ev, InvalidRequest)
    assert ev.error is NbdErrno.ENOSPC
    # Per-request error, not a connection error: answer and keep going.
    pair.server.send_error(99, ev.error)
    pair.server.send_error(5, ev.error)
    assert pair.server.state is ConnectionState.TRANSMISSION


def test_bad_length_over_32mib(pair):
    _ready(pair, size=2**40)
    (ev,) = pair.raw_c(raw_request(Cmd.READ, 0, MAX_PAYLOAD + 1))
    assert isinstance(ev, InvalidRequest)
    assert ev.error is NbdErrno.EINVAL
    # An oversized WRITE payload is skipped as it arrives, never buffered.
    (ev,) = pair.raw_c(raw_request(Cmd.WRITE, 0, MAX_PAYLOAD + 4096, cookie=7))
    assert isinstance(ev, InvalidRequest)
    assert ev.error is NbdErrno.EINVAL
    chunk = bytes(1024 * 1024)
    for _ in range(32):
        pair.server.receive_data(chunk)
        assert pair.drain(pair.server) == []
    assert pair.server.receive_buffer.high_water < 2 * 1024 * 1024
    tail = raw_request(Cmd.FLUSH, 0, 0, cookie=8)
    pair.server.receive_data(bytes(4096) + tail)
    (ev,) = pair.drain(pair.server)
    assert ev == Flush(cookie=8)
    # Trim is not a payload command: a large length is fine within the export.
    (ev,) = pair.raw_c(raw_request(Cmd.TRIM, 0, 2**32 - 4096, cookie=9))
    assert isinstance(ev, Trim)


def test_bad_length_over_advertised_maximum(pair):
    _ready(pair, block_sizes=BlockSizeInfo(minimum=512, preferred=4096, maximum=65536))
    (ev,) = pair.raw_c(raw_request(Cmd.WRITE, 0, 131072) + bytes(131072))
    assert isinstance(ev, InvalidRequest)
    assert ev.error is NbdErrno.EINVAL
    (ev,) = pair.raw_c(raw_request(Cmd.READ, 100, 512, cookie=3))
    assert isinstance(ev, InvalidRequest)
    assert "aligned" in ev.reason


def test_bad_unknown_command(pair):
    _ready(pair)
    (ev,) = pair.raw_c(raw_request(42, 0, 0))
    assert isinstance(ev, InvalidRequest)
    assert ev.error is NbdErrno.EINVAL
    assert "unknown command" in ev.reason


def test_bad_unknown_and_misplaced_flags(pair):
    _ready(pair)
    (ev,) = pair.raw_c(raw_request(Cmd.READ, 0, 512, flags=1 << 9))
    assert isinstance(ev, InvalidRequest)
    assert ev.error is NbdErrno.EINVAL
    (ev,) = pair.raw_c(raw_request(Cmd.READ, 0, 512, flags=CmdFlag.REQ_ONE, cookie=2))
    assert isinstance(ev, InvalidRequest)
    assert "not valid" in ev.reason


def test_bad_flags_not_advertised(make_pair):
    pair = make_pair()
    pair.handshake(flags=TxFlag.HAS_FLAGS | TxFlag.READ_ONLY)
    evs = pair.raw_c(
        raw_request(Cmd.FLUSH, 0, 0, cookie=1)
        + raw_request(Cmd.READ, 0, 512, flags=CmdFlag.FUA, cookie=2)
        + raw_request(Cmd.WRITE, 0, 2, cookie=3)
        + b"hi"
    )
    assert [(e.cookie, e.error) for e in evs] == [
        (1, NbdErrno.EINVAL),
        (2, NbdErrno.EINVAL),
        (3, NbdErrno.EPERM),
    ]
    with pytest.raises(LocalProtocolError):
        pair.client.flush()


def test_bad_request_magic_and_duplicate_cookie(pair):
    _ready(pair)
    pair.raw_c(raw_request(Cmd.READ, 0, 512, cookie=1))
    with pytest.raises(RemoteProtocolError, match="in flight"):
        pair.raw_c(raw_request(Cmd.READ, 0, 512, cookie=1))
    other = make_server_in_transmission()
    other.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(RemoteProtocolError, match="magic"):
        other.next_event()


def make_server_in_transmission() -> ServerConnection:
    from blockbackup.nbd.proto import ClientFlags, ExportInfo, OptExportName

    server = fresh_server()
    server.receive_data(struct.pack(">I", 3))
    assert isinstance(server.next_event(), ClientFlags)
    server.receive_data(struct.pack(">QII", Magic.IHAVEOPT, Opt.EXPORT_NAME, 0))
    assert server.next_event() == OptExportName(name="")
    server.send(ExportInfo(size=4096))
    assert server.state is ConnectionState.TRANSMISSION
    return server


def test_client_rejects_reply_for_unknown_cookie(pair):
    _ready(pair)
    pair.client.receive_data(struct.pack(">IIQ", Magic.SIMPLE_REPLY, 0, 12345))
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        pair.client.next_event()


def test_client_enforces_max_in_flight(make_pair):
    pair = make_pair(client=ClientConnection(max_in_flight=2))
    pair.handshake()
    pair.client.read(0, 512)
    pair.client.read(512, 512)
    assert not pair.client.can_send()
    with pytest.raises(LocalProtocolError):
        pair.client.read(1024, 512)


def test_server_rejects_overlapping_and_short_reads(pair):
    _ready(pair)
    cookie, parts = pair.client.read(0, 1024)
    pair.raw_c(pair.join(parts))
    pair.server.send(OffsetData(cookie=cookie, offset=0, data=b"a" * 512))
    with pytest.raises(LocalProtocolError, match="overlap"):
        pair.server.send(OffsetHole(cookie=cookie, offset=256, length=512))


def test_server_refuses_early_done(make_pair):
    pair = make_pair()
    pair.handshake()
    cookie, parts = pair.client.read(0, 1024)
    pair.raw_c(pair.join(parts))
    with pytest.raises(LocalProtocolError, match="covers"):
        pair.server.send(OffsetData(cookie=cookie, offset=0, data=b"a" * 512, done=True))


def test_option_error_must_be_error_code():
    with pytest.raises(LocalProtocolError):
        OptionError(code=Rep.ACK)


def test_errno_mapping():
    import errno

    assert NbdErrno.from_host(errno.EDQUOT) is NbdErrno.ENOSPC
    assert NbdErrno.from_host(errno.EROFS) is NbdErrno.EPERM
    assert NbdErrno.from_host(errno.ELOOP) is NbdErrno.EIO
    assert NbdErrno.from_wire(9999) is NbdErrno.EINVAL
