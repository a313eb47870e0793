"""An asyncio NBD client session: connect, negotiate, then multiplex requests.

Why: the ``nbd`` block driver (a remote export as a node) needs concurrent requests over one
connection. :class:`NbdClient` owns exactly one reader task, which feeds the sans-IO
``ClientConnection`` and completes one future per cookie; callers send synchronously right
after the protocol serialises (so the stream and the protocol state agree) and await their
future. Nothing is fire-and-forget: when the connection ends, every pending request fails
with ``OSError`` and :meth:`NbdClient.close` waits for the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from blockbackup._sockets import parse_socket_address
from blockbackup.errors import BlockBackupError
from blockbackup.nbd.proto import (
    CONTEXT_BASE_ALLOCATION,
    MAX_FEED,
    MAX_PAYLOAD,
    NEED_DATA,
    ClientConnection,
    ClientFlags,
    Cmd,
    CmdFlag,
    ConnectionClosed,
    Event,
    Extent,
    Info,
    MetaContext,
    NegotiatedExport,
    OptGo,
    OptionAck,
    OptionError,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
    ProtocolError,
    RequestDone,
    ServerGreeting,
    TlsUpgrade,
    TxFlag,
)
from blockbackup.nbd.proto.transmission import check_request
from blockbackup.nbd.proto.wire import Buffer
from blockbackup.nbd.tls import TlsCredentials

__all__ = ["NbdClient", "NbdConnectError"]

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 64


class NbdConnectError(BlockBackupError):
    """Connecting or negotiating failed."""


class NbdClient:
    """One negotiated NBD connection. Create with :meth:`connect`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: ClientConnection,
        export: NegotiatedExport,
        max_in_flight: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self.export = export
        self._pending: dict[int, asyncio.Future[RequestDone]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._error: OSError | None = None
        self._closing = False
        self._reader_task = asyncio.create_task(self._read_loop(), name="nbd-client-reader")

    # -- connecting --------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        addr: Mapping[str, Any],
        export: str = "",
        *,
        tls: TlsCredentials | None = None,
        tls_hostname: str | None = None,
        contexts: Sequence[str] = (CONTEXT_BASE_ALLOCATION,),
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout: float = 30.0,
    ) -> NbdClient:
        """Connect to ``addr`` (a QAPI SocketAddress) and open export ``export``.

        :raise NbdConnectError: with the reason (refused, TLS, unknown export, ...).
        """
        parsed = parse_socket_address(addr)
        try:
            async with asyncio.timeout(timeout):
                if parsed["type"] == "unix":
                    reader, writer = await asyncio.open_unix_connection(
                        parsed["path"], limit=MAX_FEED
                    )
                else:
                    reader, writer = await asyncio.open_connection(
                        parsed["host"], int(parsed["port"]), limit=MAX_FEED
                    )
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, TimeoutError) as exc:
            raise NbdConnectError(f"Failed to connect to NBD server: {exc}") from exc
        conn = ClientConnection(max_in_flight=max_in_flight)
        try:
            async with asyncio.timeout(timeout):
                negotiated = await _negotiate(
                    reader, writer, conn, export, tls, tls_hostname, contexts
                )
        except BaseException as exc:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if isinstance(exc, NbdConnectError | asyncio.CancelledError):
                raise
            if isinstance(exc, Exception):
                raise NbdConnectError(f"NBD negotiation failed: {exc}") from exc
            raise
        return cls(reader, writer, conn, negotiated, max_in_flight)

    # -- properties --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def flags(self) -> TxFlag:
        return self.export.transmission_flags

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TxFlag.READ_ONLY)

    def can(self, flag: TxFlag) -> bool:
        return bool(self.flags & flag)

    @property
    def max_block(self) -> int:
        sizes = self.export.block_sizes
        return min(sizes.maximum, MAX_PAYLOAD) if sizes else MAX_PAYLOAD

    @property
    def min_block(self) -> int:
        sizes = self.export.block_sizes
        return sizes.minimum if sizes else 1

    # -- the reader --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        conn = self._conn
        error: OSError = OSError(errno.ESHUTDOWN, "NBD connection closed")
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = await self._reader.read(MAX_FEED)
                    conn.receive_data(data)
                    continue
                if isinstance(event, RequestDone):
                    fut = self._pending.pop(event.cookie, None)
                    if fut is not None and not fut.done():
                        fut.set_result(event)
                elif isinstance(event, ConnectionClosed):
                    break
        except (ProtocolError, ConnectionError) as exc:
            if not self._closing:
                log.warning("NBD connection lost: %s", exc)
            error = OSError(errno.EIO, f"NBD connection lost: {exc}")
        finally:
            self._error = error
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self._pending.clear()

    # -- requests ----------------------------------------------------------------------------

    async def _request(self, build: Any, *args: Any, **kw: Any) -> RequestDone:
        async with self._slots:
            if self._error is not None:
                raise OSError(self._error.errno, str(self._error))
            cookie, parts = build(*args, **kw)
            fut: asyncio.Future[RequestDone] = asyncio.get_running_loop().create_future()
            self._pending[cookie] = fut
            for part in parts:
                self._writer.write(part)
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                raise OSError(errno.EIO, f"NBD connection lost: {exc}") from exc
            done = await fut
        if done.error is not None:
            raise OSError(int(done.error), done.message or f"NBD error {done.error.name}")
        return done

    def _check(self, command: Cmd, offset: int, length: int, flags: CmdFlag = CmdFlag(0)) -> None:  # noqa: B008
        """Refuse what the protocol would refuse, without breaking the connection."""
        problem = check_request(self.export, command, offset, length, flags)
        if problem is not None:
            raise OSError(int(problem[0]), problem[1])

    async def read(self, offset: int, length: int) -> Buffer:
        self._check(Cmd.READ, offset, length)
        done = await self._request(self._conn.read, offset, length)
        assert done.data is not None
        return done.data

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        flags = CmdFlag.FUA if fua else CmdFlag(0)
        self._check(Cmd.WRITE, offset, memoryview(data).nbytes, flags)
        await self._request(self._conn.write, offset, data, flags)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = True,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        flags = CmdFlag(0)
        if not may_trim:
            flags |= CmdFlag.NO_HOLE
        if fast:
            flags |= CmdFlag.FAST_ZERO
        if fua:
            flags |= CmdFlag.FUA
        self._check(Cmd.WRITE_ZEROES, offset, length, flags)
        await self._request(self._conn.write_zeroes, offset, length, flags)

    async def trim(self, offset: int, length: int) -> None:
        self._check(Cmd.TRIM, offset, length)
        await self._request(self._conn.trim, offset, length)

    async def flush(self) -> None:
        self._check(Cmd.FLUSH, 0, 0)
        await self._request(self._conn.flush)

    async def block_status(
        self, offset: int, length: int, context: str = CONTEXT_BASE_ALLOCATION
    ) -> tuple[Extent, ...] | None:
        """Extents of ``context`` from ``offset`` (None if the context was not negotiated)."""
        cid = self.export.context_id(context)
        if cid is None:
            return None
        self._check(Cmd.BLOCK_STATUS, offset, length)
        done = await self._request(self._conn.block_status, offset, length)
        return done.extents.get(cid)

    async def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC), then wait for the reader to finish."""
        if self._closing:
            await asyncio.wait([self._reader_task])
            return
        self._closing = True
        if self._error is None:
            with contextlib.suppress(Exception):
                for part in self._conn.disconnect():
                    self._writer.write(part)
                await self._writer.drain()
            with contextlib.suppress(Exception):
                self._writer.write_eof()
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(self._reader_task)
        except TimeoutError:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def _negotiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: ClientConnection,
    export: str,
    tls: TlsCredentials | None,
    tls_hostname: str | None,
    contexts: Sequence[str],
) -> NegotiatedExport:
    async def next_event() -> Event:
        while True:
            ev = conn.next_event()
            if ev is not NEED_DATA:
                assert isinstance(ev, Event)
                return ev
            data = await reader.read(MAX_FEED)
            conn.receive_data(data)

    async def send(event: Event) -> None:
        for part in conn.send(event):
            writer.write(part)
        await writer.drain()

    async def final(what: str) -> list[Event]:
        """Collect replies until the option's ACK; raise on an error reply."""
        got: list[Event] = []
        while True:
            ev = await next_event()
            if isinstance(ev, OptionError):
                raise NbdConnectError(f"{what}: {ev.message or hex(ev.code)}")
            if isinstance(ev, OptionAck | TlsUpgrade | NegotiatedExport):
                got.append(ev)
                return got
            if isinstance(ev, ConnectionClosed):
                raise NbdConnectError(f"{what}: server closed the connection")
            got.append(ev)

    greeting = await next_event()
    if not isinstance(greeting, ServerGreeting):
        raise NbdConnectError("server did not greet")
    await send(ClientFlags())
    if tls is not None:
        await send(OptStartTls())
        (ev,) = (await final("TLS negotiation failed"))[-1:]
        if not isinstance(ev, TlsUpgrade):
            raise NbdConnectError("server refused TLS")
        await writer.start_tls(tls.context(), server_hostname=tls_hostname)
        conn.tls_established()
    await send(OptStructuredReply())
    structured = True
    try:
        await final("structured replies")
    except NbdConnectError:
        structured = False
    if structured and contexts:
        await send(OptSetMetaContext(export_name=export, queries=tuple(contexts)))
        with contextlib.suppress(NbdConnectError):
            for ev in await final("meta contexts"):
                if isinstance(ev, MetaContext):
                    log.debug("NBD meta context %s = %d", ev.name, ev.context_id)
    await send(OptGo(name=export, info_requests=(Info.NAME, Info.BLOCK_SIZE)))
    got = await final(f"Requested export '{export}' not available")
    negotiated = got[-1]
    if not isinstance(negotiated, NegotiatedExport):
        raise NbdConnectError("server did not enter transmission")
    return negotiated
