"""Transmission phase: requests, simple replies and structured chunks.

Why: once the handshake fixed a ``NegotiatedExport``, every request can be
checked in isolation. ``check_request`` holds the rules once (advertised
commands and flags, block sizes, bounds) and both roles use it: the server
answers a bad request with a per-request errno (an ``InvalidRequest``
event), while the client refuses to send it (``LocalProtocolError``).
Malformed framing (magic, unknown cookie, inconsistent chunk) is never
per-request: it makes the stream unparseable and raises
``RemoteProtocolError``.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

from .buffer import ReceiveBuffer
from .constants import (
    ALL_CMD_FLAGS,
    MAX_PAYLOAD,
    REPLY_TYPE_ERROR_BIT,
    Cmd,
    CmdFlag,
    Magic,
    NbdErrno,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    REQUEST_CLASSES,
    BlockStatusChunk,
    Chunk,
    Disconnect,
    ErrorChunk,
    Event,
    Extent,
    InvalidRequest,
    NegotiatedExport,
    OffsetData,
    OffsetHole,
    Read,
    ReplyDone,
    Request,
    RequestDone,
    SimpleReply,
    Write,
    _RangeRequest,
    parsed_range_request,
    parsed_write,
)
from .wire import (
    ERROR_HEAD,
    EXTENT,
    OFFSET_HOLE,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    U32,
    U64,
    Buffer,
    decode_message,
)

#: Flags (besides FUA, valid everywhere) each command accepts.
_COMMAND_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE: CmdFlag(0),
    Cmd.DISC: CmdFlag(0),
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag(0),
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}
#: Transmission flag that must be advertised before a command may be sent.
#: (CACHE is absent on purpose: the spec notes clients send it regardless.)
_COMMAND_NEEDS: dict[Cmd, TxFlag] = {
    Cmd.FLUSH: TxFlag.SEND_FLUSH,
    Cmd.TRIM: TxFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlag.SEND_WRITE_ZEROES,
}
_FLAG_NEEDS: dict[CmdFlag, TxFlag] = {
    CmdFlag.FUA: TxFlag.SEND_FUA,
    CmdFlag.DF: TxFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TxFlag.SEND_FAST_ZERO,
}
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_ERROR_OFFSET_OK = (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS)


def check_request(
    export: NegotiatedExport, command: int, offset: int, length: int, flags: int
) -> tuple[NbdErrno, str] | None:
    """Return ``(errno, reason)`` if the request must be refused, else None."""
    if command not in REQUEST_CLASSES:
        return NbdErrno.EINVAL, f"unknown command {command}"
    cmd = Cmd(command)
    if cmd is Cmd.DISC:
        return None
    tx = export.transmission_flags
    if flags & ~int(ALL_CMD_FLAGS):
        return NbdErrno.EINVAL, f"unknown command flags {flags:#x}"
    if flags & ~int(_COMMAND_FLAGS[cmd] | CmdFlag.FUA):
        return NbdErrno.EINVAL, f"flags {flags:#x} not valid for {cmd.name}"
    for flag, needs in _FLAG_NEEDS.items():
        if flags & flag and not tx & needs:
            return NbdErrno.EINVAL, f"flag {flag.name} not advertised"
    needs_tx = _COMMAND_NEEDS.get(cmd)
    if needs_tx is not None and not tx & needs_tx:
        return NbdErrno.EINVAL, f"{cmd.name} not advertised"
    if cmd is Cmd.BLOCK_STATUS and not (export.structured_replies and export.meta_contexts):
        return NbdErrno.EINVAL, "no metadata context negotiated"
    if tx & TxFlag.READ_ONLY and cmd in _WRITES:
        return NbdErrno.EPERM, "export is read-only"
    if cmd is Cmd.FLUSH:
        if offset or length:
            return NbdErrno.EINVAL, "FLUSH offset and length must be zero"
        return None
    sizes = export.block_sizes
    if cmd in (Cmd.READ, Cmd.WRITE):
        limit = min(sizes.maximum, MAX_PAYLOAD) if sizes else MAX_PAYLOAD
        if length > limit:
            return NbdErrno.EINVAL, f"length {length} exceeds maximum block size {limit}"
    elif (
        sizes
        and (cmd is Cmd.CACHE or (cmd is Cmd.WRITE_ZEROES and not flags & CmdFlag.FAST_ZERO))
        and length > sizes.maximum
    ):
        return NbdErrno.EINVAL, f"length {length} exceeds maximum block size"
    if sizes and sizes.minimum > 1 and (offset % sizes.minimum or length % sizes.minimum):
        return NbdErrno.EINVAL, f"request not aligned to {sizes.minimum}"
    if offset + length > export.size:
        err = NbdErrno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else NbdErrno.EINVAL
        return err, "request extends beyond the end of the export"
    return None


#: Request flags as enum members, precomputed for every value ``ALL_CMD_FLAGS`` allows.
_FLAG_MEMBERS = tuple(CmdFlag(i) for i in range(int(ALL_CMD_FLAGS) + 1))
_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)
_REQUEST_MAGIC = int(Magic.REQUEST)
_SIMPLE_MAGIC = int(Magic.SIMPLE_REPLY)
_STRUCTURED_MAGIC = int(Magic.STRUCTURED_REPLY)
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
#: Structured reply header followed by the OFFSET_DATA offset.
_DATA_CHUNK_HEAD = struct.Struct(">IHHQIQ")


def fast_read_write_flags(export: NegotiatedExport) -> tuple[int | None, int | None]:
    """Flags READ and WRITE may carry without ``check_request`` (None: always check).

    Why: READ and WRITE are nearly every request; precomputing which flags the export
    advertised lets the parser accept a well-formed one with a few integer tests, and
    anything else still goes through ``check_request`` for its exact errno and reason.
    """
    tx = int(export.transmission_flags)
    if export.block_sizes is not None and export.block_sizes.minimum < 1:
        return None, None  # nonsensical sizes: let check_request decide everything
    fua = int(CmdFlag.FUA) if tx & TxFlag.SEND_FUA else 0
    read = fua | (int(CmdFlag.DF) if tx & TxFlag.SEND_DF else 0)
    write = None if tx & TxFlag.READ_ONLY else fua
    return read, write


@dataclass(slots=True)
class _InFlight:
    """A request awaiting (the rest of) its reply."""

    command: int
    offset: int
    length: int
    flags: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0
    content_chunks: int = 0
    contexts: dict[int, tuple[Extent, ...]] = field(default_factory=dict)
    error: NbdErrno | None = None
    message: str = ""
    error_offset: int | None = None
    result: bytearray | memoryview | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    def content_problem(self, start: int, size: int) -> str | None:
        """Why a content chunk [start, start+size) is invalid, or None."""
        if self.command != Cmd.READ:
            return "content chunk for a request that is not READ"
        if start < self.offset or start + size > self.end:
            return "content chunk outside the request"
        if self.flags & CmdFlag.DF and self.content_chunks:
            return "more than one content chunk despite NBD_CMD_FLAG_DF"
        for a, b in self.ranges:
            if start < b and a < start + size:
                return "content chunk overlaps an earlier chunk"
        return None

    def add_content(self, start: int, size: int) -> None:
        self.ranges.append((start, start + size))
        self.covered += size
        self.content_chunks += 1

    def blockstatus_problem(self, export: NegotiatedExport, chunk: BlockStatusChunk) -> str | None:
        if self.command != Cmd.BLOCK_STATUS:
            return "block status chunk for a request that is not BLOCK_STATUS"
        if chunk.context_id not in export.meta_contexts:
            return f"context id {chunk.context_id} was not negotiated"
        if chunk.context_id in self.contexts:
            return f"context id {chunk.context_id} reported twice"
        if self.flags & CmdFlag.REQ_ONE:
            if len(chunk.extents) != 1 or chunk.extents[0][0] > self.length:
                return "REQ_ONE needs exactly one extent within the request"
        elif sum(e[0] for e in chunk.extents[:-1]) >= max(self.length, 1):
            return "extents before the last one exceed the request length"
        return None

    def error_offset_problem(self, offset: int | None) -> str | None:
        if offset is None:
            return None
        if self.command not in _ERROR_OFFSET_OK:
            return "ERROR_OFFSET is not valid for this command"
        if not self.offset <= offset < self.end:
            return "error offset outside the request"
        return None

    def completion_problem(self, export: NegotiatedExport) -> str | None:
        if self.error is not None:
            return None
        if self.command == Cmd.READ and self.covered != self.length:
            return f"READ reply covers {self.covered} of {self.length} bytes"
        if self.command == Cmd.BLOCK_STATUS and set(self.contexts) != set(export.meta_contexts):
            return "BLOCK_STATUS reply lacks a chunk for some context"
        return None


def _chunk_header(chunk: Chunk, rtype: ReplyType, length: int) -> bytes:
    flags = ReplyFlag.DONE if chunk.done else 0
    return STRUCTURED_REPLY.pack(Magic.STRUCTURED_REPLY, flags, rtype, chunk.cookie, length)


def encode_chunk(chunk: Chunk) -> list[Buffer]:
    """Serialize one structured reply chunk; data payloads stay uncopied."""
    if isinstance(chunk, OffsetData):
        size = memoryview(chunk.data).nbytes
        head = _chunk_header(chunk, ReplyType.OFFSET_DATA, 8 + size) + U64.pack(chunk.offset)
        return [head, chunk.data]
    if isinstance(chunk, OffsetHole):
        body = OFFSET_HOLE.pack(chunk.offset, chunk.length)
        return [_chunk_header(chunk, ReplyType.OFFSET_HOLE, len(body)) + body]
    if isinstance(chunk, BlockStatusChunk):
        body = U32.pack(chunk.context_id) + b"".join(EXTENT.pack(*e) for e in chunk.extents)
        return [_chunk_header(chunk, ReplyType.BLOCK_STATUS, len(body)) + body]
    if isinstance(chunk, ErrorChunk):
        msg = chunk.message.encode("utf-8")
        body = ERROR_HEAD.pack(chunk.error, len(msg)) + msg
        rtype = ReplyType.ERROR
        if chunk.offset is not None:
            body += U64.pack(chunk.offset)
            rtype = ReplyType.ERROR_OFFSET
        return [_chunk_header(chunk, rtype, len(body)) + body]
    if isinstance(chunk, ReplyDone):
        return [_chunk_header(chunk, ReplyType.NONE, 0)]
    raise LocalProtocolError(f"not a chunk: {type(chunk).__name__}")


# ------------------------------------------------------------------ server


class ServerTransmission:
    """Parses requests and serializes replies for one negotiated export."""

    def __init__(self, export: NegotiatedExport, buffer: ReceiveBuffer) -> None:
        self.export = export
        self._buf = buffer
        self._in_flight: dict[int, _InFlight] = {}
        self.closed = False
        self._fast_flags = fast_read_write_flags(export)
        sizes = export.block_sizes
        self._max_len = min(sizes.maximum, MAX_PAYLOAD) if sizes else MAX_PAYLOAD
        self._align = sizes.minimum if sizes and sizes.minimum > 1 else 1
        #: Header fields of a WRITE whose payload is still arriving in the buffer's sink.
        self._partial: tuple[int, int, int, int, int] | None = None

    @property
    def in_flight(self) -> int:
        """Requests received but not yet completely answered."""
        return len(self._in_flight)

    def next_event(self) -> Event | None:
        buf = self._buf
        if self.closed:
            if buf:
                raise RemoteProtocolError("data after NBD_CMD_DISC")
            return None
        payload: Buffer = b""
        if self._partial is not None:
            sink = buf.take_sink()
            if sink is None:
                return None
            flags, command, cookie, offset, length = self._partial
            self._partial = None
            return self._request(flags, command, cookie, offset, length, sink)
        if buf.skipping or len(buf) < REQUEST.size:
            return None
        magic, flags, command, cookie, offset, length = buf.unpack_from(REQUEST)
        if magic != _REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        if command == _DISC:
            buf.drop(REQUEST.size)
            self.closed = True
            return Disconnect(cookie=cookie, offset=offset, length=length, flags=CmdFlag(flags))
        if cookie in self._in_flight:
            raise RemoteProtocolError(f"cookie {cookie:#x} is already in flight")
        if command == _WRITE:
            if length > MAX_PAYLOAD:
                # Never buffer it: drop the payload as it streams past.
                buf.drop(REQUEST.size + length)
                problem = NbdErrno.EINVAL, f"write of {length} bytes exceeds {MAX_PAYLOAD}"
                return self._refuse(cookie, command, offset, length, flags, problem)
            buf.drop(REQUEST.size)
            if len(buf) < length:
                # Incomplete: the rest of the payload goes straight into its own buffer
                # (bounded just above), never through the receive buffer.
                buf.open_sink(length)
                self._partial = flags, command, cookie, offset, length
                return self.next_event()
            payload = buf.consume(length)
        else:
            buf.drop(REQUEST.size)
        return self._request(flags, command, cookie, offset, length, payload)

    def _refuse(
        self,
        cookie: int,
        command: int,
        offset: int,
        length: int,
        flags: int,
        problem: tuple[NbdErrno, str],
    ) -> InvalidRequest:
        self._in_flight[cookie] = _InFlight(command, offset, length, flags)
        return InvalidRequest(
            cookie=cookie,
            command=command,
            offset=offset,
            length=length,
            flags=flags,
            error=problem[0],
            reason=problem[1],
        )

    def _request(
        self, flags: int, command: int, cookie: int, offset: int, length: int, payload: Buffer
    ) -> Event:
        """The event for a complete, well-framed request (a refusal if the rules say so)."""
        self._in_flight[cookie] = _InFlight(command, offset, length, flags)
        if command <= _WRITE:
            # READ/WRITE: accept what check_request would accept with integer tests only.
            allowed = self._fast_flags[command]
            if (
                allowed is not None
                and not flags & ~allowed
                and length <= self._max_len
                and offset + length <= self.export.size
                and not (offset % self._align or length % self._align)
            ):
                if command == _WRITE:
                    return parsed_write(cookie, offset, payload, _FLAG_MEMBERS[flags])
                return parsed_range_request(Read, cookie, offset, length, _FLAG_MEMBERS[flags])
        problem = check_request(self.export, command, offset, length, flags)
        if problem is not None:
            del self._in_flight[cookie]
            return self._refuse(cookie, command, offset, length, flags, problem)
        cls = REQUEST_CLASSES[command]
        if cls is Write:
            return parsed_write(cookie, offset, payload, CmdFlag(flags))
        if issubclass(cls, _RangeRequest):
            return parsed_range_request(cls, cookie, offset, length, CmdFlag(flags))
        return cls(cookie=cookie, offset=offset, length=length, flags=CmdFlag(flags))  # type: ignore[call-arg]

    def reply_ok(self, cookie: int) -> list[Buffer]:
        """``send(SimpleReply(cookie=cookie))`` without building the event (hot path)."""
        pending = self._in_flight.get(cookie)
        if pending is None or pending.command == _READ:
            return self.send(SimpleReply(cookie=cookie))  # raises the precise error
        del self._in_flight[cookie]
        return [SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, cookie)]

    def reply_read(self, cookie: int, offset: int, data: Buffer) -> list[Buffer]:
        """A whole, successful READ in one piece (an OFFSET_DATA chunk or a simple reply).

        The common case skips the event objects; anything unusual (no such request, an
        earlier chunk or error, a range that is not exactly the request's) takes
        :meth:`send`, which checks it in full.
        """
        pending = self._in_flight.get(cookie)
        size = memoryview(data).nbytes
        structured = self.export.structured_replies
        if (
            pending is None
            or pending.command != _READ
            or pending.content_chunks
            or pending.error is not None
            or offset != pending.offset
            or size != pending.length
            or not size
        ):
            if not structured:
                return self.send(SimpleReply(cookie=cookie, payload=data))
            if not size:
                return self.send(ReplyDone(cookie=cookie))
            return self.send(OffsetData(cookie=cookie, offset=offset, data=data, done=True))
        del self._in_flight[cookie]
        if structured:
            head = _DATA_CHUNK_HEAD.pack(
                _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + size, offset
            )
        else:
            head = SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, cookie)
        return [head, data]

    def _lookup(self, cookie: int) -> _InFlight:
        pending = self._in_flight.get(cookie)
        if pending is None:
            raise LocalProtocolError(f"no request with cookie {cookie:#x} in flight")
        return pending

    def send(self, event: Event) -> list[Buffer]:
        if isinstance(event, SimpleReply):
            return self._send_simple(event)
        if isinstance(event, Chunk):
            return self._send_chunk(event)
        raise LocalProtocolError(f"the server cannot send {type(event).__name__} now")

    def _send_simple(self, event: SimpleReply) -> list[Buffer]:
        pending = self._lookup(event.cookie)
        if pending.command == Cmd.READ:
            if self.export.structured_replies:
                raise LocalProtocolError("READ must be answered with structured chunks")
            if event.error is None:
                size = -1 if event.payload is None else memoryview(event.payload).nbytes
                if size != pending.length:
                    raise LocalProtocolError(f"READ reply needs exactly {pending.length} bytes")
        elif event.payload is not None:
            raise LocalProtocolError("only READ replies carry a payload")
        del self._in_flight[event.cookie]
        head = SIMPLE_REPLY.pack(Magic.SIMPLE_REPLY, event.error or 0, event.cookie)
        return [head] if event.payload is None else [head, event.payload]

    def _send_chunk(self, chunk: Chunk) -> list[Buffer]:
        if not self.export.structured_replies:
            raise LocalProtocolError("structured replies were not negotiated")
        pending = self._lookup(chunk.cookie)
        problem: str | None = None
        if isinstance(chunk, OffsetData | OffsetHole):
            size = chunk.length if isinstance(chunk, OffsetHole) else memoryview(chunk.data).nbytes
            problem = pending.content_problem(chunk.offset, size)
            if problem is None:
                pending.add_content(chunk.offset, size)
        elif isinstance(chunk, BlockStatusChunk):
            problem = pending.blockstatus_problem(self.export, chunk)
            if problem is None:
                pending.contexts[chunk.context_id] = chunk.extents
        elif isinstance(chunk, ErrorChunk):
            problem = pending.error_offset_problem(chunk.offset)
            if problem is None and pending.error is None:
                pending.error = chunk.error
        if problem is None and chunk.done:
            problem = pending.completion_problem(self.export)
        if problem is not None:
            raise LocalProtocolError(problem)
        if chunk.done:
            del self._in_flight[chunk.cookie]
        return encode_chunk(chunk)


# ------------------------------------------------------------------ client


class ClientTransmission:
    """Serializes requests, tracks them and reassembles their replies."""

    def __init__(
        self,
        export: NegotiatedExport,
        buffer: ReceiveBuffer,
        max_in_flight: int | None = None,
    ) -> None:
        self.export = export
        self._buf = buffer
        self._in_flight: dict[int, _InFlight] = {}
        self._max_in_flight = max_in_flight
        self._next_cookie = 1
        self._events: deque[Event] = deque()
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def can_send(self) -> bool:
        """True unless ``max_in_flight`` requests are already outstanding."""
        return self._max_in_flight is None or len(self._in_flight) < self._max_in_flight

    def allocate_cookie(self) -> int:
        """A cookie not currently in flight."""
        while True:
            cookie = self._next_cookie
            self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
            if cookie not in self._in_flight:
                return cookie

    def send(self, event: Event, into: bytearray | memoryview | None = None) -> list[Buffer]:
        """Serialize a request; ``into`` receives READ data (else a new bytearray)."""
        if self.closed:
            raise LocalProtocolError("NBD_CMD_DISC was sent; nothing may follow")
        if not isinstance(event, Request):
            raise LocalProtocolError(f"the client cannot send {type(event).__name__} now")
        head = REQUEST.pack(
            Magic.REQUEST, event.flags, event.command, event.cookie, event.offset, event.length
        )
        if isinstance(event, Disconnect):
            self.closed = True
            return [head]
        if event.cookie in self._in_flight:
            raise LocalProtocolError(f"cookie {event.cookie:#x} is already in flight")
        if not self.can_send():
            raise LocalProtocolError(f"{self._max_in_flight} requests already in flight")
        problem = check_request(self.export, event.command, event.offset, event.length, event.flags)
        if problem is not None:
            raise LocalProtocolError(problem[1], problem[0])
        pending = _InFlight(event.command, event.offset, event.length, event.flags)
        if event.command is Cmd.READ:
            if into is not None and memoryview(into).nbytes != event.length:
                raise LocalProtocolError("READ target buffer has the wrong size")
            pending.result = into if into is not None else bytearray(event.length)
        self._in_flight[event.cookie] = pending
        if isinstance(event, Write):
            return [head, event.data]
        return [head]

    def next_event(self) -> Event | None:
        if self._events:
            return self._events.popleft()
        buf = self._buf
        if len(buf) < 4:
            return None
        (magic,) = buf.unpack_from(U32)
        if magic == Magic.SIMPLE_REPLY:
            return self._simple()
        if magic == Magic.STRUCTURED_REPLY:
            return self._structured()
        raise RemoteProtocolError(f"bad reply magic {magic:#x}")

    def _pending(self, cookie: int) -> _InFlight:
        pending = self._in_flight.get(cookie)
        if pending is None:
            raise RemoteProtocolError(f"reply for cookie {cookie:#x} that is not in flight")
        return pending

    def _simple(self) -> Event | None:
        buf = self._buf
        if len(buf) < SIMPLE_REPLY.size:
            return None
        _, error, cookie = buf.unpack_from(SIMPLE_REPLY)
        pending = self._pending(cookie)
        is_read = pending.command == Cmd.READ
        if is_read and self.export.structured_replies:
            raise RemoteProtocolError("simple reply to READ after structured replies")
        err = None if error == 0 else NbdErrno.from_wire(error)
        payload: memoryview | None = None
        if is_read and err is None:
            if len(buf) < SIMPLE_REPLY.size + pending.length:
                return None
            buf.drop(SIMPLE_REPLY.size)
            assert pending.result is not None
            buf.copy_into(pending.result, 0, pending.length)
            buf.drop(pending.length)
            payload = memoryview(pending.result)
        else:
            buf.drop(SIMPLE_REPLY.size)
        del self._in_flight[cookie]
        self._events.append(
            RequestDone(cookie=cookie, command=Cmd(pending.command), error=err, data=payload)
        )
        return SimpleReply(cookie=cookie, error=err, payload=payload)

    def _structured(self) -> Event | None:
        buf = self._buf
        if not self.export.structured_replies:
            raise RemoteProtocolError("structured reply without negotiation")
        if len(buf) < STRUCTURED_REPLY.size:
            return None
        _, flags, rtype, cookie, length = buf.unpack_from(STRUCTURED_REPLY)
        pending = self._pending(cookie)
        if length > MAX_PAYLOAD + 8:
            raise RemoteProtocolError(f"structured chunk of {length} bytes is too large")
        if len(buf) < STRUCTURED_REPLY.size + length:
            return None
        done = bool(flags & ReplyFlag.DONE)
        hs = STRUCTURED_REPLY.size
        chunk: Chunk
        if rtype == ReplyType.OFFSET_DATA:
            if length < 9:
                raise RemoteProtocolError("OFFSET_DATA chunk too short")
            (offset,) = buf.unpack_from(U64, hs)
            size = length - 8
            self._content(pending, offset, size)
            assert pending.result is not None
            start = offset - pending.offset
            # Copy straight from the receive buffer into the READ result.
            buf.copy_into(pending.result, start, size, hs + 8)
            buf.drop(hs + length)
            data = memoryview(pending.result)[start : start + size]
            chunk = OffsetData(cookie=cookie, offset=offset, data=data, done=done)
        else:
            buf.drop(hs)
            body = memoryview(buf.consume(length))
            chunk = self._decode_small(pending, rtype, cookie, body, done)
        if done:
            problem = pending.completion_problem(self.export)
            if problem is not None:
                raise RemoteProtocolError(problem)
            del self._in_flight[cookie]
            result: Buffer | None = None
            if pending.command == Cmd.READ and pending.error is None:
                result = pending.result
            self._events.append(
                RequestDone(
                    cookie=cookie,
                    command=Cmd(pending.command),
                    error=pending.error,
                    message=pending.message,
                    error_offset=pending.error_offset,
                    data=result,
                    extents=dict(pending.contexts),
                )
            )
        return chunk

    def _content(self, pending: _InFlight, offset: int, size: int) -> None:
        problem = pending.content_problem(offset, size)
        if problem is not None:
            raise RemoteProtocolError(problem)
        pending.add_content(offset, size)

    def _decode_small(
        self, pending: _InFlight, rtype: int, cookie: int, body: memoryview, done: bool
    ) -> Chunk:
        length = len(body)
        if rtype == ReplyType.NONE:
            if length or not done:
                raise RemoteProtocolError("NONE chunk must be empty and final")
            return ReplyDone(cookie=cookie)
        if rtype == ReplyType.OFFSET_HOLE:
            if length != OFFSET_HOLE.size:
                raise RemoteProtocolError("OFFSET_HOLE chunk must be 12 bytes")
            hole_offset, size = OFFSET_HOLE.unpack(body)
            if size == 0:
                raise RemoteProtocolError("OFFSET_HOLE of size zero")
            self._content(pending, hole_offset, size)
            assert pending.result is not None
            start = hole_offset - pending.offset
            memoryview(pending.result).cast("B")[start : start + size] = bytes(size)
            return OffsetHole(cookie=cookie, offset=hole_offset, length=size, done=done)
        if rtype == ReplyType.BLOCK_STATUS:
            if length < 12 or (length - 4) % 8:
                raise RemoteProtocolError("BLOCK_STATUS chunk has a bad length")
            (cid,) = U32.unpack_from(body)
            extents = tuple(Extent(*e) for e in EXTENT.iter_unpack(body[4:]))
            if any(e.length == 0 for e in extents):
                raise RemoteProtocolError("extent of length zero")
            bs = BlockStatusChunk(cookie=cookie, context_id=cid, extents=extents, done=done)
            problem = pending.blockstatus_problem(self.export, bs)
            if problem is not None:
                raise RemoteProtocolError(problem)
            pending.contexts[cid] = extents
            return bs
        if rtype & REPLY_TYPE_ERROR_BIT:
            if length < ERROR_HEAD.size:
                raise RemoteProtocolError("error chunk too short")
            error, msglen = ERROR_HEAD.unpack_from(body)
            if error == 0:
                raise RemoteProtocolError("error chunk with error 0")
            tail = 8 if rtype == ReplyType.ERROR_OFFSET else 0
            if ERROR_HEAD.size + msglen + tail > length or (
                tail and ERROR_HEAD.size + msglen + tail != length
            ):
                raise RemoteProtocolError("error chunk message length inconsistent")
            message = decode_message(body[ERROR_HEAD.size : ERROR_HEAD.size + msglen])
            offset: int | None = None
            if tail:
                (offset,) = U64.unpack_from(body, ERROR_HEAD.size + msglen)
                problem = pending.error_offset_problem(offset)
                if problem is not None:
                    raise RemoteProtocolError(problem)
            err = NbdErrno.from_wire(error)
            if pending.error is None:
                pending.error, pending.message, pending.error_offset = err, message, offset
            return ErrorChunk(cookie=cookie, error=err, message=message, offset=offset, done=done)
        raise RemoteProtocolError(f"unknown structured reply type {rtype}")


__all__ = [
    "ClientTransmission",
    "ServerTransmission",
    "check_request",
    "encode_chunk",
]
