"""Receive transmission-phase bytes straight into the sans-IO connection.

Why: a ``StreamReader`` copies every byte several times (``recv`` into new bytes, into
its buffer, out again with ``read``, into the protocol's buffer, out as the payload).
This ``BufferedProtocol`` takes over the client's transport once the handshake is done
(without TLS) and lets the socket write

* a WRITE payload that is still arriving straight into its final buffer (the protocol's
  sink, ``ServerConnection.receive_view``): one copy, from the kernel;
* everything else into one reused scratch buffer fed to ``receive_data``.

Writing is untouched: flow control (``pause_writing``/``resume_writing``) and
``connection_lost`` are forwarded to the stream protocol it replaced, so
``StreamWriter.write``/``drain``/``close``/``wait_closed`` keep working.

Backpressure: reading pauses while more than ``PAUSE_BYTES`` unparsed bytes are
buffered, and resumes when the request loop runs out of events (:meth:`wait`). The
request loop itself stops asking for events while ``max_in_flight`` requests run, so
neither requests nor bytes pile up without bound.
"""

from __future__ import annotations

import asyncio
from typing import Any

from blockbackup.nbd.proto import MAX_FEED, ProtocolError, ServerConnection

__all__ = ["PAUSE_BYTES", "SCRATCH_BYTES", "TransmissionReceiver", "take_over"]

#: Bytes received per ``recv_into`` outside WRITE payloads.
SCRATCH_BYTES = 256 * 1024
#: Unparsed bytes buffered before reading pauses.
PAUSE_BYTES = MAX_FEED


class TransmissionReceiver(asyncio.BufferedProtocol):
    """The transport's protocol during transmission; :meth:`wait` is the reader's side."""

    def __init__(
        self, conn: ServerConnection, inner: asyncio.BaseProtocol, transport: asyncio.Transport
    ) -> None:
        self._conn = conn
        self._inner = inner
        self._transport = transport
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._direct = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._paused = False

    # -- transport callbacks -------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._conn.receive_view()
        self._direct = view is not None
        return view if view is not None else self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._direct:
                self._conn.received_into(nbytes)
            else:
                self._conn.receive_data(self._scratch[:nbytes])
        except ProtocolError as exc:  # e.g. the receive cap: this client is broken
            self.fail(exc)
            return
        if self._conn.buffered >= PAUSE_BYTES and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.feed_eof()
        self._wake()
        return True  # keep the transport open: replies to what is in flight still go out

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            if self._error is None:
                self._error = exc
        else:
            self.feed_eof()
        self._wake()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- the request loop's side ---------------------------------------------------------

    async def wait(self) -> None:
        """Until more bytes (or EOF) arrived; raises what broke the stream, if anything.

        The caller drained the connection's events first, so reading may resume.
        """
        if self._error is not None:
            raise self._error
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def feed(self, data: bytes) -> None:
        """Bytes another reader had buffered before this one took over."""
        view = memoryview(data)
        try:
            for start in range(0, len(view), MAX_FEED):
                self._conn.receive_data(view[start : start + MAX_FEED])
        except ProtocolError as exc:
            self.fail(exc)

    # -- helpers -------------------------------------------------------------------------

    def feed_eof(self) -> None:
        """The peer will send nothing more."""
        try:
            self._conn.receive_data(b"")
        except ProtocolError as exc:  # the connection already failed
            if self._error is None:
                self._error = exc

    def fail(self, exc: BaseException) -> None:
        """The stream broke: the next :meth:`wait` raises ``exc``."""
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def take_over(
    conn: ServerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> TransmissionReceiver | None:
    """Replace ``reader``'s protocol on ``writer``'s transport with a receiver.

    Whatever ``reader`` had buffered, and its EOF, move to ``conn``. Returns None (and
    changes nothing) when that buffer cannot be reached; the caller keeps the reader.
    """
    # StreamReader has no public way to take its buffer without awaiting; read the
    # attribute CPython has used since 3.4, and fall back if it is not there.
    pending: Any = getattr(reader, "_buffer", None)
    if not isinstance(pending, bytearray):
        return None
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)
    receiver = TransmissionReceiver(conn, transport.get_protocol(), transport)
    data = bytes(pending)
    pending.clear()
    transport.set_protocol(receiver)
    receiver.feed(data)
    error = reader.exception()
    if error is not None:
        receiver.fail(error)
    elif reader.at_eof():
        receiver.feed_eof()
    transport.resume_reading()  # the StreamReader may have paused it; reading is ours now
    return receiver
