"""Option haggling (fixed newstyle only) for both roles.

Theory of operation
-------------------
The handshake is a strict ping-pong: the server greets, the client answers
with its flags, then the client sends one option at a time and the server
answers it with zero or more informational replies and one final reply.
``TRANSITIONS`` below is the single source of truth for that conversation.
It maps ``state -> event type -> next state`` and does not know which role
is asking: the server *receives* ``Opt*`` events and *sends* replies, the
client does the opposite, and both feed every event (sent or received)
through ``HandshakeCore.process``. Because the table is shared, the two
roles cannot disagree about what may come next.

A ``*_REPLY`` state means "an option of that kind is pending, the server
owes replies". Informational replies keep the state; ``OptionAck`` or
``OptionError`` end it. Three exits leave the option loop:

* ``GO_REPLY --OptionAck--> TRANSMISSION`` and
  ``EXPORT_NAME_REPLY --ExportInfo--> TRANSMISSION`` hand over to
  ``transmission.py`` with a ``NegotiatedExport``;
* ``ABORT_REPLY --OptionAck/OptionError--> CLOSED`` (soft disconnect);
* ``STARTTLS_REPLY --OptionAck--> TLS_UPGRADE``: the I/O layer wraps the
  socket in TLS, then calls ``tls_established()``, which feeds
  ``TlsEstablished`` and returns to ``OPTIONS`` while forgetting structured
  replies and meta contexts negotiated in clear text (the spec requires it).

A pair missing from the table is a protocol violation: ``process`` moves to
``ERROR`` and raises ``LocalProtocolError``; the connection turns that into
``RemoteProtocolError`` when the event came from the peer. Guards that need
more than the event type (an ACK to GO must follow an ``ExportInfo``; client
flags must match what the server offered) live in ``HandshakeCore._apply``,
next to the table. Oldstyle and non-fixed newstyle never reach the table:
the readers refuse them.
"""

from __future__ import annotations

import enum

from .buffer import ReceiveBuffer
from .constants import (
    MAX_OPTION_LENGTH,
    REP_ERROR_BIT,
    ClientFlag,
    HandshakeFlag,
    Info,
    Magic,
    Opt,
    Rep,
    TxFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    BlockSizeInfo,
    ClientFlags,
    Event,
    ExportDescription,
    ExportInfo,
    ExportName,
    InvalidOption,
    MetaContext,
    NegotiatedExport,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    Option,
    OptionAck,
    OptionError,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
    ServerGreeting,
    ServerListEntry,
    TlsEstablished,
    TlsUpgrade,
    UnknownInfo,
    UnknownOption,
)
from .wire import (
    CLIENT_FLAGS,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    U16,
    U32,
    Reader,
    WireError,
    decode_message,
    decode_string,
    encode_string,
    pack_len_string,
    pack_option,
    pack_option_reply,
)


class HandshakeState(enum.Enum):
    """Where the option conversation stands (shared by both roles)."""

    GREETING = "GREETING"
    CLIENT_FLAGS = "CLIENT_FLAGS"
    OPTIONS = "OPTIONS"
    EXPORT_NAME_REPLY = "EXPORT_NAME_REPLY"
    ABORT_REPLY = "ABORT_REPLY"
    LIST_REPLY = "LIST_REPLY"
    STARTTLS_REPLY = "STARTTLS_REPLY"
    INFO_REPLY = "INFO_REPLY"
    GO_REPLY = "GO_REPLY"
    STRUCTURED_REPLY_REPLY = "STRUCTURED_REPLY_REPLY"
    LIST_META_REPLY = "LIST_META_REPLY"
    SET_META_REPLY = "SET_META_REPLY"
    REJECT_REPLY = "REJECT_REPLY"
    TLS_UPGRADE = "TLS_UPGRADE"
    TRANSMISSION = "TRANSMISSION"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


_S = HandshakeState
_INFO_EVENTS: tuple[type[Event], ...] = (
    ExportInfo,
    ExportName,
    ExportDescription,
    BlockSizeInfo,
    UnknownInfo,
)

#: state -> event type -> next state. Everything not listed is a violation.
TRANSITIONS: dict[HandshakeState, dict[type[Event], HandshakeState]] = {
    _S.GREETING: {ServerGreeting: _S.CLIENT_FLAGS},
    _S.CLIENT_FLAGS: {ClientFlags: _S.OPTIONS},
    _S.OPTIONS: {
        OptExportName: _S.EXPORT_NAME_REPLY,
        OptAbort: _S.ABORT_REPLY,
        OptList: _S.LIST_REPLY,
        OptStartTls: _S.STARTTLS_REPLY,
        OptInfo: _S.INFO_REPLY,
        OptGo: _S.GO_REPLY,
        OptStructuredReply: _S.STRUCTURED_REPLY_REPLY,
        OptListMetaContext: _S.LIST_META_REPLY,
        OptSetMetaContext: _S.SET_META_REPLY,
        UnknownOption: _S.REJECT_REPLY,
        InvalidOption: _S.REJECT_REPLY,
    },
    _S.EXPORT_NAME_REPLY: {ExportInfo: _S.TRANSMISSION},
    _S.ABORT_REPLY: {OptionAck: _S.CLOSED, OptionError: _S.CLOSED},
    _S.LIST_REPLY: {
        ServerListEntry: _S.LIST_REPLY,
        OptionAck: _S.OPTIONS,
        OptionError: _S.OPTIONS,
    },
    _S.STARTTLS_REPLY: {OptionAck: _S.TLS_UPGRADE, OptionError: _S.OPTIONS},
    _S.TLS_UPGRADE: {TlsEstablished: _S.OPTIONS},
    _S.INFO_REPLY: {
        **dict.fromkeys(_INFO_EVENTS, _S.INFO_REPLY),
        OptionAck: _S.OPTIONS,
        OptionError: _S.OPTIONS,
    },
    _S.GO_REPLY: {
        **dict.fromkeys(_INFO_EVENTS, _S.GO_REPLY),
        OptionAck: _S.TRANSMISSION,
        OptionError: _S.OPTIONS,
    },
    _S.STRUCTURED_REPLY_REPLY: {OptionAck: _S.OPTIONS, OptionError: _S.OPTIONS},
    _S.LIST_META_REPLY: {
        MetaContext: _S.LIST_META_REPLY,
        OptionAck: _S.OPTIONS,
        OptionError: _S.OPTIONS,
    },
    _S.SET_META_REPLY: {
        MetaContext: _S.SET_META_REPLY,
        OptionAck: _S.OPTIONS,
        OptionError: _S.OPTIONS,
    },
    _S.REJECT_REPLY: {OptionError: _S.OPTIONS},
    _S.TRANSMISSION: {},
    _S.CLOSED: {},
    _S.ERROR: {},
}

#: States in which the server owes a reply to the pending option.
REPLY_STATES = frozenset(
    s for s in HandshakeState if s.name.endswith("_REPLY") and s is not _S.EXPORT_NAME_REPLY
)


class HandshakeCore:
    """Role-agnostic handshake state plus what the options negotiated."""

    def __init__(self) -> None:
        self.state = HandshakeState.GREETING
        self.server_flags = HandshakeFlag(0)
        self.client_flags = ClientFlag(0)
        self.option: Option | None = None
        self.structured_replies = False
        self.tls = False
        self.meta_contexts: dict[int, str] = {}
        self.meta_export: str | None = None
        self.negotiated: NegotiatedExport | None = None
        self._pending_contexts: dict[int, str] = {}
        self._info: ExportInfo | None = None
        self._block_sizes: BlockSizeInfo | None = None

    @property
    def no_zeroes(self) -> bool:
        return bool(self.client_flags & ClientFlag.C_NO_ZEROES)

    def process(self, event: Event) -> HandshakeState:
        """Apply ``event``; return the new state or raise LocalProtocolError."""
        old = self.state
        new = TRANSITIONS[old].get(type(event))
        if new is None:
            self.state = HandshakeState.ERROR
            raise LocalProtocolError(f"{type(event).__name__} not allowed in state {old.name}")
        try:
            self._apply(old, new, event)
        except LocalProtocolError:
            self.state = HandshakeState.ERROR
            raise
        self.state = new
        return new

    def _apply(self, old: HandshakeState, new: HandshakeState, event: Event) -> None:
        if isinstance(event, ServerGreeting):
            if not event.flags & HandshakeFlag.FIXED_NEWSTYLE:
                raise LocalProtocolError("only fixed newstyle negotiation is supported")
            self.server_flags = HandshakeFlag(event.flags)
        elif isinstance(event, ClientFlags):
            flags = ClientFlag(event.flags)
            if flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
                raise LocalProtocolError(f"unknown client flags {int(flags):#x}")
            if not flags & ClientFlag.C_FIXED_NEWSTYLE:
                raise LocalProtocolError("client did not accept fixed newstyle")
            if flags & ClientFlag.C_NO_ZEROES and not self.server_flags & HandshakeFlag.NO_ZEROES:
                raise LocalProtocolError("NO_ZEROES was not offered by the server")
            self.client_flags = flags
        elif isinstance(event, Option):
            self.option = event
            self._info = None
            self._block_sizes = None
            if isinstance(event, OptSetMetaContext):
                # The spec: a SET replaces the previous selection, even if it fails.
                self.meta_contexts = {}
                self.meta_export = None
                self._pending_contexts = {}
        elif isinstance(event, ExportInfo):
            if self._info is not None:
                raise LocalProtocolError("NBD_INFO_EXPORT sent twice")
            self._info = event
            if old is _S.EXPORT_NAME_REPLY:
                self._finish(event)
        elif isinstance(event, BlockSizeInfo):
            self._block_sizes = event
        elif isinstance(event, MetaContext) and old is _S.SET_META_REPLY:
            if event.context_id in self._pending_contexts:
                raise LocalProtocolError(f"metadata context id {event.context_id} reused")
            self._pending_contexts[event.context_id] = event.name
        elif isinstance(event, OptionAck):
            if old in (_S.INFO_REPLY, _S.GO_REPLY) and self._info is None:
                raise LocalProtocolError("NBD_REP_ACK to INFO/GO needs NBD_INFO_EXPORT first")
            if old is _S.STRUCTURED_REPLY_REPLY:
                self.structured_replies = True
            elif old is _S.SET_META_REPLY:
                assert isinstance(self.option, OptSetMetaContext)
                self.meta_contexts = dict(self._pending_contexts)
                self.meta_export = self.option.export_name
            elif old is _S.GO_REPLY:
                assert self._info is not None
                self._finish(self._info)
        elif isinstance(event, TlsEstablished):
            self.tls = True
            self.structured_replies = False
            self.meta_contexts = {}
            self.meta_export = None

    def _finish(self, info: ExportInfo) -> None:
        option = self.option
        assert isinstance(option, OptGo | OptExportName)
        name = option.name
        contexts: dict[int, str] = {}
        if self.structured_replies and self.meta_export == name:
            contexts = dict(self.meta_contexts)
        if info.transmission_flags & TxFlag.SEND_DF and not self.structured_replies:
            raise LocalProtocolError("SEND_DF requires structured replies")
        self.negotiated = NegotiatedExport(
            name=name,
            size=info.size,
            transmission_flags=TxFlag(info.transmission_flags),
            structured_replies=self.structured_replies,
            meta_contexts=contexts,
            block_sizes=self._block_sizes,
        )


def _remote(exc: LocalProtocolError) -> RemoteProtocolError:
    return RemoteProtocolError(str(exc), exc.errno_hint)


# ------------------------------------------------------------------ server


def decode_option(code: int, data: bytes) -> Option:
    """Turn one received option into its event (server side)."""
    if code == Opt.EXPORT_NAME:
        try:
            return OptExportName(name=decode_string(data))
        except (WireError, LocalProtocolError) as exc:
            # EXPORT_NAME cannot be answered with an error: hard disconnect.
            raise RemoteProtocolError(f"bad NBD_OPT_EXPORT_NAME: {exc}") from exc
    if code == Opt.ABORT:
        return OptAbort()  # the spec: ignore any data
    try:
        if code in (Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY):
            if data:
                raise WireError("option takes no data")
            simple: dict[int, type[Option]] = {
                Opt.LIST: OptList,
                Opt.STARTTLS: OptStartTls,
                Opt.STRUCTURED_REPLY: OptStructuredReply,
            }
            return simple[code]()
        if code in (Opt.INFO, Opt.GO):
            r = Reader(data)
            name = r.len_string()
            count = r.u16()
            requests = tuple(r.u16() for _ in range(count))
            r.end()
            cls = OptGo if code == Opt.GO else OptInfo
            return cls(name=name, info_requests=requests)
        if code in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            r = Reader(data)
            name = r.len_string()
            count = r.u32()
            if count * 4 > r.remaining:
                raise WireError("query count exceeds option length")
            queries = tuple(r.len_string() for _ in range(count))
            r.end()
            mcls = OptSetMetaContext if code == Opt.SET_META_CONTEXT else OptListMetaContext
            return mcls(export_name=name, queries=queries)
    except (WireError, LocalProtocolError) as exc:
        return InvalidOption(option=code, data=data, reason=str(exc))
    return UnknownOption(option=code, data=data)


class ServerHandshake:
    """Server side of option haggling over a shared receive buffer."""

    def __init__(self, buffer: ReceiveBuffer) -> None:
        self.core = HandshakeCore()
        self._buf = buffer
        self._tls_announced = False

    @property
    def state(self) -> HandshakeState:
        return self.core.state

    def next_event(self) -> Event | None:
        """Parse the next client message, or None when more bytes are needed."""
        state = self.core.state
        buf = self._buf
        if state is _S.CLIENT_FLAGS:
            if len(buf) < CLIENT_FLAGS.size:
                return None
            (flags,) = buf.unpack_from(CLIENT_FLAGS)
            buf.drop(CLIENT_FLAGS.size)
            ev: Event = ClientFlags(flags=ClientFlag(flags))
        elif state is _S.OPTIONS:
            if len(buf) < OPTION_HEADER.size:
                return None
            magic, code, length = buf.unpack_from(OPTION_HEADER)
            if magic != Magic.IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise RemoteProtocolError(f"option length {length} exceeds {MAX_OPTION_LENGTH}")
            if len(buf) < OPTION_HEADER.size + length:
                return None
            buf.drop(OPTION_HEADER.size)
            ev = decode_option(code, buf.consume(length))
            if isinstance(ev, OptStartTls) and buf:
                raise RemoteProtocolError("data pipelined after NBD_OPT_STARTTLS")
        elif state is _S.TLS_UPGRADE and not self._tls_announced:
            self._tls_announced = True
            return TlsUpgrade()
        else:
            return None
        try:
            self.core.process(ev)
        except LocalProtocolError as exc:
            raise _remote(exc) from exc
        return ev

    def tls_established(self) -> None:
        self.core.process(TlsEstablished())
        self._tls_announced = False

    def send(self, event: Event) -> bytes:
        """Serialize a server event after checking it against the table."""
        old = self.core.state
        option = self.core.option
        self.core.process(event)
        code = option.code if option is not None else 0
        if isinstance(event, ServerGreeting):
            return GREETING.pack(Magic.NBDMAGIC, Magic.IHAVEOPT, event.flags)
        if isinstance(event, OptionAck):
            return pack_option_reply(code, Rep.ACK)
        if isinstance(event, OptionError):
            return pack_option_reply(code, event.code, encode_string(event.message))
        if isinstance(event, ServerListEntry):
            data = pack_len_string(event.name) + encode_string(event.description)
            return pack_option_reply(code, Rep.SERVER, data)
        if isinstance(event, ExportInfo):
            if old is _S.EXPORT_NAME_REPLY:
                pad = b"" if self.core.no_zeroes else bytes(EXPORT_NAME_PADDING)
                return EXPORT_NAME_REPLY.pack(event.size, event.transmission_flags) + pad
            data = INFO_EXPORT.pack(Info.EXPORT, event.size, event.transmission_flags)
            return pack_option_reply(code, Rep.INFO, data)
        if isinstance(event, ExportName):
            data = U16.pack(Info.NAME) + encode_string(event.name)
            return pack_option_reply(code, Rep.INFO, data)
        if isinstance(event, ExportDescription):
            data = U16.pack(Info.DESCRIPTION) + encode_string(event.description)
            return pack_option_reply(code, Rep.INFO, data)
        if isinstance(event, BlockSizeInfo):
            data = INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, event.minimum, event.preferred, event.maximum
            )
            return pack_option_reply(code, Rep.INFO, data)
        if isinstance(event, UnknownInfo):
            return pack_option_reply(code, Rep.INFO, U16.pack(event.info_type) + event.data)
        if isinstance(event, MetaContext):
            data = U32.pack(event.context_id) + encode_string(event.name)
            return pack_option_reply(code, Rep.META_CONTEXT, data)
        # Unreachable: the table only admits the events above for the server.
        raise LocalProtocolError(f"the server cannot send {type(event).__name__}")


# ------------------------------------------------------------------ client


def encode_option(event: Option) -> bytes:
    """Serialize one client option."""
    if isinstance(event, UnknownOption | InvalidOption):
        return pack_option(event.option, event.data)
    if isinstance(event, OptExportName):
        return pack_option(Opt.EXPORT_NAME, encode_string(event.name))
    if isinstance(event, OptInfo | OptGo):
        data = pack_len_string(event.name) + U16.pack(len(event.info_requests))
        data += b"".join(U16.pack(r) for r in event.info_requests)
        return pack_option(event.code, data)
    if isinstance(event, OptListMetaContext | OptSetMetaContext):
        data = pack_len_string(event.export_name) + U32.pack(len(event.queries))
        data += b"".join(pack_len_string(q) for q in event.queries)
        return pack_option(event.code, data)
    return pack_option(event.code)


def _decode_info(data: memoryview) -> Event:
    r = Reader(data)
    info_type = r.u16()
    if info_type == Info.EXPORT:
        if len(data) != INFO_EXPORT.size:
            raise WireError("NBD_INFO_EXPORT must be 12 bytes")
        _, size, flags = INFO_EXPORT.unpack(data)
        return ExportInfo(size=size, transmission_flags=TxFlag(flags))
    if info_type == Info.NAME:
        return ExportName(name=decode_string(r.rest()))
    if info_type == Info.DESCRIPTION:
        return ExportDescription(description=decode_string(r.rest()))
    if info_type == Info.BLOCK_SIZE:
        if len(data) != INFO_BLOCK_SIZE.size:
            raise WireError("NBD_INFO_BLOCK_SIZE must be 14 bytes")
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
        return BlockSizeInfo(minimum=minimum, preferred=preferred, maximum=maximum)
    return UnknownInfo(info_type=info_type, data=bytes(r.rest()))


def decode_option_reply(state: HandshakeState, reply: int, data: bytes) -> Event:
    """Turn one option reply into its event (client side)."""
    view = memoryview(data)
    if reply == Rep.ACK:
        if data:
            raise WireError("NBD_REP_ACK with data")
        return OptionAck()
    if reply & REP_ERROR_BIT:
        code = Rep(reply) if reply in Rep._value2member_map_ else reply
        return OptionError(code=code, message=decode_message(view))
    if reply == Rep.SERVER and state is _S.LIST_REPLY:
        r = Reader(view)
        name = r.len_string()
        return ServerListEntry(name=name, description=decode_string(r.rest()))
    if reply == Rep.INFO and state in (_S.INFO_REPLY, _S.GO_REPLY):
        return _decode_info(view)
    if reply == Rep.META_CONTEXT and state in (_S.LIST_META_REPLY, _S.SET_META_REPLY):
        r = Reader(view)
        cid = r.u32()
        return MetaContext(context_id=cid, name=decode_string(r.rest()))
    raise WireError(f"unexpected reply type {reply:#x} in {state.name}")


class ClientHandshake:
    """Client side of option haggling over a shared receive buffer."""

    def __init__(self, buffer: ReceiveBuffer) -> None:
        self.core = HandshakeCore()
        self._buf = buffer

    @property
    def state(self) -> HandshakeState:
        return self.core.state

    def next_event(self) -> Event | None:
        """Parse the next server message, or None when more bytes are needed."""
        try:
            return self._next_event()
        except (WireError, LocalProtocolError) as exc:
            self.core.state = HandshakeState.ERROR
            raise RemoteProtocolError(f"bad server reply: {exc}") from exc

    def _next_event(self) -> Event | None:
        state = self.core.state
        buf = self._buf
        if state is _S.GREETING:
            if len(buf) < GREETING.size:
                return None
            magic, magic2, flags = buf.unpack_from(GREETING)
            if magic != Magic.NBDMAGIC:
                raise RemoteProtocolError(f"bad greeting magic {magic:#x}")
            if magic2 == Magic.CLISERV:
                raise RemoteProtocolError("oldstyle negotiation is not supported")
            if magic2 != Magic.IHAVEOPT:
                raise RemoteProtocolError(f"bad greeting magic {magic2:#x}")
            if not flags & HandshakeFlag.FIXED_NEWSTYLE:
                raise RemoteProtocolError("server does not offer fixed newstyle")
            buf.drop(GREETING.size)
            ev: Event = ServerGreeting(flags=HandshakeFlag(flags))
            self.core.process(ev)
            return ev
        if state is _S.EXPORT_NAME_REPLY:
            need = EXPORT_NAME_REPLY.size + (0 if self.core.no_zeroes else EXPORT_NAME_PADDING)
            if len(buf) < need:
                return None
            size, flags = buf.unpack_from(EXPORT_NAME_REPLY)
            buf.drop(need)
            self.core.process(ExportInfo(size=size, transmission_flags=TxFlag(flags)))
            assert self.core.negotiated is not None
            return self.core.negotiated
        if state in REPLY_STATES:
            return self._read_reply(state)
        if buf and state is not _S.TRANSMISSION:
            raise RemoteProtocolError(f"unsolicited data from server in state {state.name}")
        return None

    def _read_reply(self, state: HandshakeState) -> Event | None:
        buf = self._buf
        if len(buf) < OPTION_REPLY_HEADER.size:
            return None
        magic, option, reply, length = buf.unpack_from(OPTION_REPLY_HEADER)
        if magic != Magic.OPTION_REPLY:
            raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
        assert self.core.option is not None
        if option != self.core.option.code:
            raise RemoteProtocolError(f"reply to option {option}, expected {self.core.option.code}")
        if length > MAX_OPTION_LENGTH:
            raise RemoteProtocolError(f"option reply length {length} too large")
        if len(buf) < OPTION_REPLY_HEADER.size + length:
            return None
        buf.drop(OPTION_REPLY_HEADER.size)
        ev = decode_option_reply(state, reply, buf.consume(length))
        new = self.core.process(ev)
        if new is _S.TLS_UPGRADE:
            if buf:
                raise RemoteProtocolError("data injected after the STARTTLS acknowledgement")
            return TlsUpgrade()
        if new is _S.TRANSMISSION:
            assert self.core.negotiated is not None
            return self.core.negotiated
        return ev

    def tls_established(self) -> None:
        self.core.process(TlsEstablished())

    def send(self, event: Event) -> bytes:
        """Serialize a client event after checking it against the table."""
        if not isinstance(event, ClientFlags | Option):
            raise LocalProtocolError(f"the client cannot send {type(event).__name__}")
        if isinstance(event, OptStartTls) and self.core.tls:
            raise LocalProtocolError("TLS is already established")
        self.core.process(event)
        if isinstance(event, ClientFlags):
            return CLIENT_FLAGS.pack(event.flags)
        return encode_option(event)
