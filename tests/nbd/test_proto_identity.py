"""Hypothesis: every event survives encode -> decode unchanged.

Why: the client's writer and the server's reader (and vice versa) are
separate code; identity over random valid events shows they agree.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockbackup.nbd.proto import (
    BlockSizeInfo,
    BlockStatus,
    BlockStatusChunk,
    Cache,
    Disconnect,
    ErrorChunk,
    ExportDescription,
    ExportInfo,
    ExportName,
    Extent,
    Flush,
    MetaContext,
    NbdErrno,
    OffsetData,
    OffsetHole,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptionAck,
    OptionError,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
    Read,
    Rep,
    ReplyDone,
    RequestDone,
    ServerListEntry,
    SimpleReply,
    Trim,
    TxFlag,
    UnknownInfo,
    UnknownOption,
    Write,
    WriteZeroes,
)
from blockbackup.nbd.proto.constants import CmdFlag

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
contexts = st.builds(lambda s: "x-" + s.replace(":", "") + ":" + s, names)
info_reqs = st.lists(u16, max_size=5, unique=True).map(tuple)

options = st.one_of(
    st.builds(OptExportName, name=names),
    st.just(OptAbort()),
    st.just(OptList()),
    st.just(OptStartTls()),
    st.just(OptStructuredReply()),
    st.builds(OptInfo, name=names, info_requests=info_reqs),
    st.builds(OptGo, name=names, info_requests=info_reqs),
    st.builds(
        OptListMetaContext, export_name=names, queries=st.lists(names, max_size=4).map(tuple)
    ),
    st.builds(OptSetMetaContext, export_name=names, queries=st.lists(names, max_size=4).map(tuple)),
    st.builds(UnknownOption, option=st.integers(11, 2**32 - 1), data=st.binary(max_size=64)),
)


@FAST
@given(opt=options)
def test_option_identity(make_pair, opt):
    pair = make_pair()
    pair.greet()
    assert pair.c(opt) == [opt]


tx_flags = st.integers(0, 2**16 - 1).map(lambda f: TxFlag(f | TxFlag.HAS_FLAGS))
info_replies = st.one_of(
    st.builds(ExportInfo, size=st.integers(0, 2**64 - 1), transmission_flags=tx_flags),
    st.builds(ExportName, name=names),
    st.builds(ExportDescription, description=names),
    st.builds(
        BlockSizeInfo,
        minimum=st.sampled_from([1, 512, 4096]),
        preferred=st.sampled_from([4096, 65536]),
        maximum=st.sampled_from([2**25, 2**32 - 1]),
    ),
    st.builds(UnknownInfo, info_type=st.integers(4, 2**16 - 1), data=st.binary(max_size=32)),
)
errors = st.builds(
    OptionError, code=st.sampled_from([r for r in Rep if r & (1 << 31)]), message=names
)


@FAST
@given(reply=info_replies, err=errors)
def test_info_reply_identity(make_pair, reply, err):
    pair = make_pair()
    pair.greet()
    pair.c(OptInfo(name="x"))
    assert pair.s(reply) == [reply]
    assert pair.s(err) == [err]


@FAST
@given(entry=st.builds(ServerListEntry, name=names, description=names))
def test_list_reply_identity(make_pair, entry):
    pair = make_pair()
    pair.greet()
    pair.c(OptList())
    assert pair.s(entry, OptionAck()) == [entry, OptionAck()]


@FAST
@given(meta=st.builds(MetaContext, context_id=u32, name=contexts))
def test_meta_reply_identity(make_pair, meta):
    pair = make_pair()
    pair.greet()
    pair.c(OptListMetaContext(export_name="x"))
    assert pair.s(meta) == [meta]


SIZE = 2**20
offsets = st.integers(0, SIZE // 512 - 1).map(lambda b: b * 512)
flags_rw = st.sampled_from([CmdFlag(0), CmdFlag.FUA])


@st.composite
def requests(draw):
    off = draw(offsets)
    length = draw(st.integers(1, min(SIZE - off, 65536)))
    cookie = draw(st.integers(0, 2**64 - 1))
    kind = draw(st.sampled_from(["r", "w", "f", "t", "c", "z", "b", "d"]))
    fl = draw(flags_rw)
    if kind == "r":
        return Read(
            cookie=cookie,
            offset=off,
            length=length,
            flags=fl | draw(st.sampled_from([0, CmdFlag.DF])),
        )
    if kind == "w":
        return Write(
            cookie=cookie, offset=off, data=draw(st.binary(min_size=1, max_size=2048)), flags=fl
        )
    if kind == "f":
        return Flush(cookie=cookie, flags=fl)
    if kind == "t":
        return Trim(cookie=cookie, offset=off, length=length, flags=fl)
    if kind == "c":
        return Cache(cookie=cookie, offset=off, length=length)
    if kind == "z":
        return WriteZeroes(cookie=cookie, offset=off, length=length, flags=fl | CmdFlag.NO_HOLE)
    if kind == "b":
        return BlockStatus(
            cookie=cookie,
            offset=off,
            length=length,
            flags=draw(st.sampled_from([0, CmdFlag.REQ_ONE])),
        )
    return Disconnect()


@FAST
@given(req=requests())
def test_request_identity(make_pair, req):
    pair = make_pair()
    pair.handshake(size=SIZE)
    assert pair.c(req) == [req]


@FAST
@given(
    data=st.binary(min_size=1, max_size=4096),
    hole=st.integers(1, 4096),
    err=st.sampled_from(list(NbdErrno)),
    msg=names,
    ext=st.lists(st.tuples(st.integers(1, 2**20), u32), min_size=1, max_size=8),
)
def test_chunk_identity(make_pair, data, hole, err, msg, ext):
    pair = make_pair()
    pair.handshake(size=SIZE)
    c, parts = pair.client.read(0, len(data) + hole)
    pair.raw_c(pair.join(parts))
    a = OffsetData(cookie=c, offset=0, data=data)
    b = OffsetHole(cookie=c, offset=len(data), length=hole)
    got = pair.s(a, b, ReplyDone(cookie=c))
    assert got[:3] == [a, b, ReplyDone(cookie=c)]
    assert isinstance(got[3], RequestDone)
    assert bytes(got[3].data) == data + bytes(hole)
    c, parts = pair.client.block_status(0, 2**20)
    pair.raw_c(pair.join(parts))
    extents = tuple(Extent(*e) for e in ext)
    extents = extents[:1] if sum(e[0] for e in extents[:-1]) >= 2**20 else extents
    bs = BlockStatusChunk(cookie=c, context_id=7, extents=extents)
    e1 = ErrorChunk(cookie=c, error=err, message=msg, offset=1024)
    e2 = ErrorChunk(cookie=c, error=err, message=msg, done=True)
    assert pair.s(bs, e1, e2)[:3] == [bs, e1, e2]


@FAST
@given(err=st.one_of(st.none(), st.sampled_from(list(NbdErrno))))
def test_simple_reply_identity(make_pair, err):
    pair = make_pair()
    pair.handshake(size=SIZE, structured=False)
    c, parts = pair.client.trim(0, 512)
    pair.raw_c(pair.join(parts))
    assert pair.s(SimpleReply(cookie=c, error=err))[0] == SimpleReply(cookie=c, error=err)
