"""Connection façades that carry one NBD session from greeting to close.

Why: the I/O layer should see one object per socket whatever the phase.
``ServerConnection`` and ``ClientConnection`` own the receive buffer, run the
handshake, and hand the same buffer to the transmission machine once the
export is fixed (the wsproto handshake/connection split). Exceptions move the
connection to ``ERROR``; a ``LocalProtocolError`` that surfaces while parsing
peer bytes is re-raised as ``RemoteProtocolError`` at this one boundary.
"""

from __future__ import annotations

import enum

from .buffer import ReceiveBuffer
from .constants import MAX_FEED, MAX_PAYLOAD, Cmd, CmdFlag, NbdErrno, Rep
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    BlockStatus,
    Cache,
    ConnectionClosed,
    Disconnect,
    ErrorChunk,
    Event,
    Flush,
    NegotiatedExport,
    OptionError,
    Read,
    SimpleReply,
    Trim,
    Write,
    WriteZeroes,
)
from .handshake import ClientHandshake, HandshakeState, ServerHandshake
from .transmission import ClientTransmission, ServerTransmission
from .wire import Buffer

#: Default receive cap: one maximal WRITE/READ message plus one feed.
DEFAULT_RECEIVE_CAP = MAX_PAYLOAD + 64 + MAX_FEED


class NeedData(enum.Enum):
    """Sentinel type of ``NEED_DATA``."""

    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event`` when no complete event is buffered.
NEED_DATA = NeedData.NEED_DATA


class ConnectionState(enum.Enum):
    """Coarse phase of a connection."""

    HANDSHAKE = "HANDSHAKE"
    TLS_UPGRADE = "TLS_UPGRADE"
    TRANSMISSION = "TRANSMISSION"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class _Connection:
    def __init__(self, receive_cap: int) -> None:
        self._buf = ReceiveBuffer(receive_cap)
        self._error = False
        self._closed = False

    # Implemented by the subclasses.
    def _next(self) -> Event | None:
        raise NotImplementedError

    def _handshake_state(self) -> HandshakeState:
        raise NotImplementedError

    def _transmission_closed(self) -> bool:
        raise NotImplementedError

    @property
    def state(self) -> ConnectionState:
        if self._error:
            return ConnectionState.ERROR
        hs = self._handshake_state()
        if self._closed or hs is HandshakeState.CLOSED or self._transmission_closed():
            return ConnectionState.CLOSED
        if hs is HandshakeState.TLS_UPGRADE:
            return ConnectionState.TLS_UPGRADE
        if hs is HandshakeState.TRANSMISSION:
            return ConnectionState.TRANSMISSION
        return ConnectionState.HANDSHAKE

    @property
    def buffered(self) -> int:
        """Bytes received but not parsed yet (never more than the cap)."""
        return len(self._buf)

    @property
    def receive_buffer(self) -> ReceiveBuffer:
        return self._buf

    def _check_usable(self) -> None:
        if self._error:
            raise LocalProtocolError("connection is in the ERROR state")

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed the stream.

        Feed at most ``MAX_FEED`` bytes at a time and drain ``next_event``
        in between; then the receive cap can only trip on a misbehaving peer.
        """
        self._check_usable()
        if self._handshake_state() is HandshakeState.TLS_UPGRADE:
            raise LocalProtocolError("finish the TLS handshake and call tls_established() first")
        if not memoryview(data).nbytes:
            self._buf.eof = True
            return
        try:
            self._buf.feed(data)
        except ProtocolError:
            self._error = True
            raise

    def receive_view(self) -> memoryview | None:
        """Where the next bytes from the peer may be received directly, if anywhere.

        Why: while a WRITE payload is arriving, its final buffer is known; an I/O layer
        that can receive into memory (``recv_into``) fills it there and reports the count
        with :meth:`received_into` instead of copying through :meth:`receive_data`.
        None means: use ``receive_data``.
        """
        if self._error:
            return None
        return self._buf.sink_view()

    def received_into(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`receive_view`."""
        self._check_usable()
        self._buf.sink_filled(n)

    def next_event(self) -> Event | NeedData:
        """The next event from the peer, or ``NEED_DATA``."""
        self._check_usable()
        try:
            event = self._next()
        except RemoteProtocolError:
            self._error = True
            raise
        except LocalProtocolError as exc:
            self._error = True
            raise RemoteProtocolError(str(exc), exc.errno_hint) from exc
        if event is not None:
            return event
        if self._buf.eof and not self._closed:
            if self._buf or self._buf.skipping or self._buf.sink_pending:
                self._error = True
                raise RemoteProtocolError("peer closed the connection mid-message")
            self._closed = True
            return ConnectionClosed()
        return NEED_DATA

    def _guard_send(self) -> None:
        self._check_usable()

    def _fail(self) -> None:
        self._error = True


class ServerConnection(_Connection):
    """The server role: send a ``ServerGreeting`` first, then answer events."""

    def __init__(self, *, receive_cap: int = DEFAULT_RECEIVE_CAP) -> None:
        super().__init__(receive_cap)
        self.handshake = ServerHandshake(self._buf)
        self.transmission: ServerTransmission | None = None

    def _handshake_state(self) -> HandshakeState:
        return self.handshake.state

    def _transmission_closed(self) -> bool:
        return self.transmission is not None and self.transmission.closed

    @property
    def export(self) -> NegotiatedExport | None:
        """What transmission runs on, once the handshake has finished."""
        return self.handshake.core.negotiated

    @property
    def pending_option(self) -> int | None:
        """Code of the option currently awaiting replies (handshake only)."""
        option = self.handshake.core.option
        return option.code if option is not None else None

    def _next(self) -> Event | None:
        if self.transmission is not None:
            return self.transmission.next_event()
        return self.handshake.next_event()

    def tls_established(self) -> None:
        """The I/O layer finished the TLS handshake after ``TlsUpgrade``."""
        self._check_usable()
        self.handshake.tls_established()

    def send(self, event: Event) -> list[Buffer]:
        """Serialize ``event``; READ data is returned as its own uncopied item."""
        self._check_usable()
        try:
            if self.transmission is not None:
                return self.transmission.send(event)
            out: list[Buffer] = [self.handshake.send(event)]
        except ProtocolError:
            self._fail()
            raise
        if self.handshake.state is HandshakeState.TRANSMISSION:
            assert self.export is not None
            self.transmission = ServerTransmission(self.export, self._buf)
        return out

    # -- conveniences -----------------------------------------------------

    def reject_option(self, code: Rep = Rep.ERR_UNSUP, message: str = "") -> list[Buffer]:
        """Answer the pending option with an error (ERR_UNSUP by default)."""
        return self.send(OptionError(code=code, message=message))

    def send_error(self, cookie: int, error: NbdErrno, message: str = "") -> list[Buffer]:
        """Fail a request: an error chunk if structured, else a simple reply."""
        export = self.export
        if export is not None and export.structured_replies:
            return self.send(ErrorChunk(cookie=cookie, error=error, message=message, done=True))
        return self.send(SimpleReply(cookie=cookie, error=error))

    def send_ok(self, cookie: int) -> list[Buffer]:
        """Complete a request that has no reply payload."""
        self._check_usable()
        if self.transmission is None:
            return self.send(SimpleReply(cookie=cookie))
        try:
            return self.transmission.reply_ok(cookie)
        except ProtocolError:
            self._fail()
            raise

    def send_read(self, cookie: int, offset: int, data: Buffer) -> list[Buffer]:
        """Answer a whole READ with ``data`` (one chunk, or a simple reply)."""
        self._check_usable()
        if self.transmission is None:
            return self.send(SimpleReply(cookie=cookie, payload=data))
        try:
            return self.transmission.reply_read(cookie, offset, data)
        except ProtocolError:
            self._fail()
            raise


class ClientConnection(_Connection):
    """The client role: wait for ``ServerGreeting``, then drive options."""

    def __init__(
        self, *, receive_cap: int = DEFAULT_RECEIVE_CAP, max_in_flight: int | None = None
    ) -> None:
        super().__init__(receive_cap)
        self.handshake = ClientHandshake(self._buf)
        self.transmission: ClientTransmission | None = None
        self._max_in_flight = max_in_flight

    def _handshake_state(self) -> HandshakeState:
        return self.handshake.state

    def _transmission_closed(self) -> bool:
        return self.transmission is not None and self.transmission.closed

    @property
    def export(self) -> NegotiatedExport | None:
        return self.handshake.core.negotiated

    def _next(self) -> Event | None:
        if self.transmission is not None:
            return self.transmission.next_event()
        event = self.handshake.next_event()
        if self.handshake.state is HandshakeState.TRANSMISSION and self.transmission is None:
            assert self.export is not None
            self.transmission = ClientTransmission(self.export, self._buf, self._max_in_flight)
        return event

    def tls_established(self) -> None:
        self._check_usable()
        self.handshake.tls_established()

    def send(self, event: Event, *, into: bytearray | memoryview | None = None) -> list[Buffer]:
        """Serialize ``event``; WRITE data is returned as its own uncopied item."""
        self._check_usable()
        try:
            if self.transmission is not None:
                return self.transmission.send(event, into)
            if into is not None:
                raise LocalProtocolError("'into' only applies to READ requests")
            return [self.handshake.send(event)]
        except ProtocolError:
            self._fail()
            raise

    # -- conveniences -----------------------------------------------------

    def _tx(self) -> ClientTransmission:
        if self.transmission is None:
            raise LocalProtocolError("not in the transmission phase")
        return self.transmission

    @property
    def in_flight(self) -> int:
        return self.transmission.in_flight if self.transmission is not None else 0

    def can_send(self) -> bool:
        return self._tx().can_send()

    def allocate_cookie(self) -> int:
        return self._tx().allocate_cookie()

    def read(
        self,
        offset: int,
        length: int,
        flags: CmdFlag = CmdFlag(0),  # noqa: B008
        *,
        into: bytearray | memoryview | None = None,
    ) -> tuple[int, list[Buffer]]:
        """Queue a READ; the result arrives as ``RequestDone.data``."""
        cookie = self.allocate_cookie()
        event = Read(cookie=cookie, offset=offset, length=length, flags=flags)
        return cookie, self.send(event, into=into)

    def write(
        self,
        offset: int,
        data: Buffer,
        flags: CmdFlag = CmdFlag(0),  # noqa: B008
    ) -> tuple[int, list[Buffer]]:
        cookie = self.allocate_cookie()
        return cookie, self.send(Write(cookie=cookie, offset=offset, data=data, flags=flags))

    def _simple(
        self, command: Cmd, offset: int, length: int, flags: CmdFlag
    ) -> tuple[int, list[Buffer]]:
        cookie = self.allocate_cookie()
        cls = {
            Cmd.TRIM: Trim,
            Cmd.CACHE: Cache,
            Cmd.WRITE_ZEROES: WriteZeroes,
            Cmd.BLOCK_STATUS: BlockStatus,
        }[command]
        return cookie, self.send(cls(cookie=cookie, offset=offset, length=length, flags=flags))

    def flush(self, flags: CmdFlag = CmdFlag(0)) -> tuple[int, list[Buffer]]:  # noqa: B008
        cookie = self.allocate_cookie()
        return cookie, self.send(Flush(cookie=cookie, flags=flags))

    def trim(
        self,
        offset: int,
        length: int,
        flags: CmdFlag = CmdFlag(0),  # noqa: B008
    ) -> tuple[int, list[Buffer]]:
        return self._simple(Cmd.TRIM, offset, length, flags)

    def cache(
        self,
        offset: int,
        length: int,
        flags: CmdFlag = CmdFlag(0),  # noqa: B008
    ) -> tuple[int, list[Buffer]]:
        return self._simple(Cmd.CACHE, offset, length, flags)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        flags: CmdFlag = CmdFlag(0),  # noqa: B008
    ) -> tuple[int, list[Buffer]]:
        return self._simple(Cmd.WRITE_ZEROES, offset, length, flags)

    def block_status(
        self,
        offset: int,
        length: int,
        flags: CmdFlag = CmdFlag(0),  # noqa: B008
    ) -> tuple[int, list[Buffer]]:
        return self._simple(Cmd.BLOCK_STATUS, offset, length, flags)

    def disconnect(self) -> list[Buffer]:
        """NBD_CMD_DISC; nothing may be sent afterwards."""
        return self.send(Disconnect())
