"""The asyncio NBD server: sockets in, sans-IO protocol in the middle, block nodes out.

Why: ``nbd/proto`` knows the protocol but owns no socket; the block layer knows the data
but no protocol. This module is the thin runtime between them (hypercorn's shape): an
accept loop, and one :class:`_Client` per connection that

* runs the option haggling against the :class:`~blockbackup.nbd.exports.ExportManager`
  (LIST, INFO/GO, meta contexts, STARTTLS through ``StreamWriter.start_tls``);
* in transmission, receives through :mod:`~blockbackup.nbd.receiver` (without TLS) and
  serves each request in its own task, so replies may leave out of order; a WRITE or
  READ the block layer completes at once (its one admission function,
  ``BlockNode.submit_write`` / ``submit_read``) is answered without a task. At
  most ``max_in_flight`` tasks run per client; when they do, the reader stops reading
  (backpressure onto the client's socket);
* queues every reply synchronously right after ``send()`` (so the protocol state and the
  byte stream stay in the same order), then awaits ``drain()``. In transmission, replies
  queued during one event-loop iteration leave in one ``write`` (small ones joined), so
  16 writes completing together cost one ``send`` syscall, not 16; a queue holding
  ``FLUSH_BYTES`` or more is written at once, so what sits in the queue stays bounded and
  ``drain()`` keeps applying backpressure. The handshake writes at once (STARTTLS swaps
  the transport right after its reply).

Failure rules: a protocol error, a vanished peer or a bug while serving one client ends
that client's connection and nothing else. I/O errors become per-request NBD errnos.
Cancellation (``nbd-server-stop``, a hard export removal) is never swallowed.

Every write goes through :class:`~blockbackup.block.node.BlockNode`'s request layer, so
copy-before-write and dirty tracking see NBD writes like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any

from blockbackup._sockets import bind_unix, parse_socket_address
from blockbackup.block.driver import BUFFER_TYPES, Status, WriteFlags
from blockbackup.errors import BlockBackupError
from blockbackup.nbd.exports import ExportManager, NbdExport
from blockbackup.nbd.proto import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    MAX_FEED,
    MAX_PAYLOAD,
    NEED_DATA,
    AllocationState,
    BlockSizeInfo,
    BlockStatus,
    BlockStatusChunk,
    Cache,
    ClientFlags,
    CmdFlag,
    ConnectionClosed,
    DirtyState,
    Disconnect,
    ErrorChunk,
    Event,
    ExportDescription,
    ExportInfo,
    ExportName,
    Extent,
    Flush,
    Info,
    InvalidOption,
    InvalidRequest,
    MetaContext,
    NbdErrno,
    OffsetData,
    OffsetHole,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptionAck,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
    ProtocolError,
    Read,
    Rep,
    Request,
    ServerConnection,
    ServerGreeting,
    ServerListEntry,
    TlsUpgrade,
    Trim,
    UnknownOption,
    Write,
    WriteZeroes,
)
from blockbackup.nbd.proto.wire import Buffer
from blockbackup.nbd.receiver import TransmissionReceiver, take_over
from blockbackup.nbd.tls import TlsCredentials

__all__ = ["NbdServer"]

log = logging.getLogger(__name__)

#: Requests served concurrently per client before the reader stops reading.
DEFAULT_MAX_IN_FLIGHT = 32
#: Seconds a client may take to reach transmission (QEMU uses 10 s too).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Reads at least this long are checked for holes (structured replies only).
SPARSE_READ_MIN = 64 * 1024
#: Most extents sent per context in one BLOCK_STATUS reply, and block-status
#: calls made per sparse READ.
MAX_EXTENTS = 1024
MAX_READ_EXTENTS = 16
#: The preferred block size advertised to clients.
PREFERRED_BLOCK = 4096
#: Queued reply bytes that are written at once rather than at the end of the iteration.
FLUSH_BYTES = 64 * 1024
#: Reply parts up to this size are joined into one buffer before writing; larger ones
#: (READ payloads) are handed to the transport uncopied.
JOIN_MAX = 16 * 1024
#: Requests served in a row without a task before the request loop yields to the others,
#: and reply bytes (inline READs) after which it yields sooner.
INLINE_YIELD = 32
INLINE_YIELD_BYTES = 4 * 1024 * 1024
#: A run of zero bytes this long is shorter than any file-system hole (a block is at
#: least 512 bytes): data without one has no hole, so a sparse READ is one data chunk.
_ZERO_RUN = bytes(512)
#: Kernel send buffer asked for per client: one 1 MiB READ reply fits, so the loop
#: does not wake for every fraction of it.
SEND_BUFFER = 4 * 1024 * 1024

_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_DF = int(CmdFlag.DF)


class _Close(Exception):
    """End this connection quietly (handshake abort, unknown EXPORT_NAME)."""


def _close_unrun(coro: Coroutine[Any, Any, None], _task: object) -> None:
    """Close a request's coroutine whose task ended (a no-op if it ran)."""
    coro.close()


class NbdServer:
    """``nbd-server-start`` / ``nbd-server-stop``: one listener serving an ExportManager.

    :param exports: the export registry (shared with ``block-export-*``); ``tls-creds``
        are looked up among the objects of its graph.
    :param max_in_flight: requests served concurrently per client.
    """

    def __init__(
        self,
        exports: ExportManager,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.exports = exports
        self.max_in_flight = max_in_flight
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None
        self._unix_path: str | None = None
        self._clients: dict[_Client, asyncio.Task[None]] = {}
        self.tls: TlsCredentials | None = None
        self.max_connections = 0
        self.address: dict[str, str] | None = None
        self._held = False

    @property
    def running(self) -> bool:
        return self._server is not None

    def hold(self) -> None:
        """Answer nobody until :meth:`release`: a listener started meanwhile only listens.

        Why: the daemon processes its whole command line before it serves anyone, as
        qemu-storage-daemon does. A client that connects as soon as the socket exists
        (``--nbd-server`` comes before the ``--export`` it wants) is queued by the kernel
        and answered once every option has been processed, or sees the connection
        closed if the daemon exits with an error instead.
        """
        self._held = True

    async def release(self) -> None:
        """Start answering clients (those queued while held first)."""
        self._held = False
        if self._server is not None and not self._server.is_serving():
            await self._server.start_serving()

    async def start(
        self,
        addr: Mapping[str, Any],
        *,
        tls_creds: str | TlsCredentials | None = None,
        tls_authz: str | None = None,
        max_connections: int = 0,
    ) -> None:
        """``nbd-server-start``: listen on ``addr`` (a QAPI SocketAddress).

        :raise BlockBackupError: "NBD server already running", bad address or credentials.
        """
        if self._server is not None:
            raise BlockBackupError("NBD server already running")
        if tls_authz is not None:
            raise BlockBackupError("tls-authz is not supported")
        if max_connections < 0:
            raise BlockBackupError(
                "Parameter 'max-connections' expects uint32_t"
            )  # pragma: no cover - QMP validates
        parsed = parse_socket_address(addr)
        creds: TlsCredentials | None
        if isinstance(tls_creds, str):
            creds = self.exports.graph.objects.tls_credentials(tls_creds, "server")
        else:
            creds = tls_creds
            if creds is not None and creds.endpoint != "server":
                raise BlockBackupError("Expecting TLS credentials with a server endpoint")
        if creds is not None:
            creds.context()  # load now: bad files fail the command, not the first client
        if parsed["type"] == "unix":
            sock = bind_unix(parsed["path"])
            try:
                server = await asyncio.start_unix_server(
                    self._accept, sock=sock, limit=MAX_FEED, start_serving=not self._held
                )
            except BaseException:
                sock.close()
                raise
            self._unix_path = parsed["path"]
            self.address = dict(parsed)
        else:
            try:
                server = await asyncio.start_server(
                    self._accept,
                    parsed["host"],
                    int(parsed["port"]),
                    limit=MAX_FEED,
                    reuse_address=True,
                    start_serving=not self._held,
                )
            except (OSError, ValueError) as exc:
                raise BlockBackupError(f"Failed to bind socket: {exc}") from exc
            if self._held:
                _listen(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.address = {"type": "inet", "host": str(host), "port": str(port)}
        self._server = server
        self.tls = creds
        self.max_connections = max_connections
        self.exports.server_running = True

    async def stop(self) -> None:
        """``nbd-server-stop``: close the listener, remove every export, drop every client."""
        if self._server is None:
            raise BlockBackupError("NBD server not running")
        server, self._server = self._server, None
        self.exports.server_running = False
        server.close()
        self.exports.close_all()
        for client in list(self._clients):
            client.abort()
        tasks = list(self._clients.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5)
            for task in late:  # pragma: no cover - a request stuck in the block layer
                task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None
        self.address = None
        self.tls = None

    @property
    def connections(self) -> int:
        return len(self._clients)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One task per connection (asyncio runs this callback as a task)."""
        if self._server is None or (
            self.max_connections and len(self._clients) >= self.max_connections
        ):
            writer.close()
            return
        client = _Client(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._clients[client] = task
        try:
            await client.run()
        finally:
            del self._clients[client]


def _listen(server: asyncio.Server) -> None:
    """Make a server that does not serve yet listen already (asyncio listens only when
    it starts serving): early clients then wait in the backlog instead of being refused.
    ``listen`` acts on the socket, so a duplicate of its descriptor can call it."""
    for ts in server.sockets:
        with socket.fromfd(ts.fileno(), ts.family, ts.type) as dup:
            dup.listen(socket.SOMAXCONN)


class _Client:
    """One NBD connection: handshake, then the request loop."""

    def __init__(
        self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = ServerConnection()
        self.export: NbdExport | None = None
        self.tls = False
        self._dead = False
        self._slots = asyncio.Semaphore(server.max_in_flight)
        #: Replies queued in this loop iteration (transmission only), and their size.
        self._batching = False
        self._out: list[Buffer] = []
        self._out_bytes = 0
        #: Replaces ``reader`` in transmission without TLS (see :mod:`.receiver`).
        self._receiver: TransmissionReceiver | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Hard disconnect (export removed with ``mode=hard``, server stopping).

        The socket is dropped at once; requests already running finish (bounded by
        ``max_in_flight``) without replying, then the connection task ends by itself.
        """
        self._drop()

    def _write(self, parts: list[Buffer]) -> None:
        if self._dead:
            return
        if not self._batching:
            write = self.writer.write
            for part in parts:
                write(part)
            return
        out = self._out
        if not out:
            asyncio.get_running_loop().call_soon(self._flush)
        out.extend(parts)
        for part in parts:
            self._out_bytes += len(part)
        if self._out_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Hand the queued replies to the transport: small parts joined, large ones as is."""
        out = self._out
        if not out:
            return
        self._out = []
        self._out_bytes = 0
        if self._dead:
            return
        write = self.writer.write
        small: list[Buffer] = []
        for part in out:
            if len(part) <= JOIN_MAX:
                small.append(part)
                continue
            if small:
                write(b"".join(small) if len(small) > 1 else small[0])
                small = []
            write(part)
        if small:
            write(b"".join(small) if len(small) > 1 else small[0])

    async def _emit(self, event: Event) -> None:
        self._write(self.conn.send(event))
        await self.writer.drain()

    async def _next_event(self) -> Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            if self._receiver is not None:
                await self._receiver.wait()
                continue
            data = await self.reader.read(MAX_FEED)
            self.conn.receive_data(data)

    async def run(self) -> None:
        try:
            try:
                async with asyncio.timeout(self.server.handshake_timeout):
                    export = await self._handshake()
            except TimeoutError:
                log.debug("NBD client did not finish the handshake in time")
                return
            if export is not None:
                await self._transmission(export)
        except (ProtocolError, _Close, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("NBD connection closed: %s", exc)
        except ssl.SSLError as exc:
            log.info("NBD TLS failure: %s", exc)
        except Exception:
            log.exception("NBD connection failed")
        finally:
            self._flush()
            self._dead = True
            if self.export is not None:
                self.server.exports.detach(self.export, self)
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._wait_closed())

    async def _wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.writer.wait_closed()

    # -- handshake ---------------------------------------------------------------------------

    async def _handshake(self) -> NbdExport | None:
        await self._emit(ServerGreeting())
        while True:
            event = await self._next_event()
            if isinstance(event, ClientFlags):
                continue
            if isinstance(event, ConnectionClosed):
                return None
            if isinstance(event, TlsUpgrade):
                await self._start_tls()
                continue
            export = await self._option(event)
            if export is not None:
                return export

    async def _start_tls(self) -> None:
        assert self.server.tls is not None
        await self.writer.start_tls(self.server.tls.context())
        self.conn.tls_established()
        self.tls = True

    async def _reject(self, code: Rep, message: str) -> None:
        self._write(self.conn.reject_option(code, message))
        await self.writer.drain()

    async def _option(self, event: Event) -> NbdExport | None:
        exports = self.server.exports
        tls_required = self.server.tls is not None and not self.tls
        if isinstance(event, OptAbort):
            await self._emit(OptionAck())
            raise _Close("client aborted the handshake")
        if isinstance(event, OptExportName):
            export = exports.lookup(event.name)
            if export is None or tls_required:
                raise _Close(f"NBD_OPT_EXPORT_NAME for unknown export {event.name!r}")
            return await self._enter(export, ExportInfo, event.name)
        if isinstance(event, OptStartTls):
            if self.server.tls is None:
                await self._reject(Rep.ERR_POLICY, "TLS not configured")
            elif self.tls:
                await self._reject(Rep.ERR_INVALID, "TLS already enabled")
            else:
                await self._emit(OptionAck())
            return None
        if tls_required:
            option = self.conn.pending_option or 0
            await self._reject(Rep.ERR_TLS_REQD, f"Option {option:#x} not permitted before TLS")
            return None
        if isinstance(event, OptList):
            for export in exports.visible():
                self._write(
                    self.conn.send(
                        ServerListEntry(name=export.name, description=export.description)
                    )
                )
            await self._emit(OptionAck())
        elif isinstance(event, OptStructuredReply):
            await self._emit(OptionAck())
        elif isinstance(event, OptListMetaContext | OptSetMetaContext):
            await self._meta(event)
        elif isinstance(event, OptInfo | OptGo):
            export = exports.lookup(event.name)
            if export is None:
                await self._reject(Rep.ERR_UNKNOWN, f"export '{event.name}' not present")
                return None
            self._send_info(export, event)
            if isinstance(event, OptGo):
                return await self._enter(export, OptionAck, event.name)
            await self._emit(OptionAck())
        elif isinstance(event, InvalidOption):
            await self._reject(Rep.ERR_INVALID, event.reason)
        elif isinstance(event, UnknownOption):
            await self._reject(Rep.ERR_UNSUP, f"Unsupported option {event.option:#x}")
        else:  # pragma: no cover - the protocol layer yields nothing else here
            raise _Close(f"unexpected {type(event).__name__} during the handshake")
        return None

    def _structured(self) -> bool:
        return self.conn.handshake.core.structured_replies

    def _send_info(self, export: NbdExport, event: OptInfo | OptGo) -> None:
        flags = export.transmission_flags(self._structured())
        self._write(self.conn.send(ExportInfo(size=export.size, transmission_flags=flags)))
        if Info.NAME in event.info_requests:
            self._write(self.conn.send(ExportName(name=export.name)))
        if Info.DESCRIPTION in event.info_requests and export.description:
            self._write(self.conn.send(ExportDescription(description=export.description)))
        self._write(
            self.conn.send(BlockSizeInfo(minimum=1, preferred=PREFERRED_BLOCK, maximum=MAX_PAYLOAD))
        )

    async def _enter(
        self, export: NbdExport, final: type[ExportInfo] | type[OptionAck], name: str
    ) -> NbdExport:
        if not self.server.exports.attach(export, self):
            raise _Close(f"export {name!r} is shutting down")
        self.export = export
        if final is ExportInfo:
            flags = export.transmission_flags(self._structured())
            await self._emit(ExportInfo(size=export.size, transmission_flags=flags))
        else:
            await self._emit(OptionAck())
        return export

    async def _meta(self, event: OptListMetaContext | OptSetMetaContext) -> None:
        listing = isinstance(event, OptListMetaContext)
        if not listing and not self._structured():
            await self._reject(Rep.ERR_INVALID, "request structured replies first")
            return
        export = self.server.exports.lookup(event.export_name)
        if export is None:
            await self._reject(Rep.ERR_UNKNOWN, f"export '{event.export_name}' not present")
            return
        for name, cid in export.match_contexts(event.queries, listing=listing):
            self._write(self.conn.send(MetaContext(context_id=cid, name=name)))
        await self._emit(OptionAck())

    # -- transmission ------------------------------------------------------------------------

    async def _transmission(self, export: NbdExport) -> None:
        negotiated = self.conn.export
        assert negotiated is not None
        self._contexts = dict(negotiated.meta_contexts)
        self._batching = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None and not self.tls:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if not self.tls:
            self._receiver = take_over(self.conn, self.reader, self.writer)
        transport = self.writer.transport
        inline = 0
        inline_bytes = 0
        async with asyncio.TaskGroup() as tasks:
            while not self._dead:
                event = await self._next_request()
                kind = type(event)
                if kind is Write or kind is Read:
                    assert isinstance(event, Write | Read)
                    pending = self._admit(export, event)
                    if pending is not None:
                        await self._slots.acquire()
                        task = tasks.create_task(self._serve(export, event, pending))
                        # Holds nothing until it runs; closed unawaited if the task
                        # never starts (an aborted connection), without a warning.
                        task.add_done_callback(functools.partial(_close_unrun, pending))
                        continue
                    # Served without a task; keep the loop and the socket flowing.
                    inline += 1
                    if kind is Read:
                        inline_bytes += event.length
                    if transport.get_write_buffer_size() > FLUSH_BYTES:
                        await self._drain()  # need not suspend: not counted as a yield
                    if inline >= INLINE_YIELD or inline_bytes >= INLINE_YIELD_BYTES:
                        await asyncio.sleep(0)
                        inline = inline_bytes = 0
                    continue
                if isinstance(event, Request) and not isinstance(event, Disconnect):
                    await self._slots.acquire()
                    tasks.create_task(self._serve(export, event, None))
                elif isinstance(event, InvalidRequest):
                    log.debug("refusing NBD request: %s", event.reason)
                    try:
                        await self._reply_error(event.cookie, event.error, event.reason)
                    except (ConnectionError, ProtocolError):
                        self._drop()
                else:  # Disconnect, EOF or a broken stream: finish what is in flight, close
                    break

    def _admit(self, export: NbdExport, req: Write | Read) -> Coroutine[Any, Any, None] | None:
        """Admit a WRITE or READ through the node's one admission function
        (``BlockNode.submit_write`` / ``submit_read``): None when it completed at once
        and its reply is queued, else the coroutine that serves it (in a task).

        Why inline at all: a page-cache write or read takes a few µs; a task, its loop
        iteration and the driver's yield cost more than that. The reply is queued at
        once, like a task's. Errors found at admission are replied here too.
        """
        try:
            if type(req) is Write:
                fua = WriteFlags.FUA if int(req.flags) & _FUA else WriteFlags.NONE
                pending = export.node.submit_write(req.offset, req.data, fua)
                if pending is not None:
                    return self._finish_write(req, pending)
                self._write(self.conn.send_ok(req.cookie))
                return None
            assert isinstance(req, Read)
            return self._admit_read(export, req)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            message = (exc.strerror or "")[:4096]
            self._write(self.conn.send_error(req.cookie, NbdErrno.from_host(code), message))
            return None

    def _admit_read(self, export: NbdExport, req: Read) -> Coroutine[Any, Any, None] | None:
        """A READ answered at once when its data is in the page cache (nodes whose driver
        chain reads at once: raw over file, filters that do not change reads; never
        snapshot-access or a filter that must wait or check), else the coroutine serving it.

        A READ to be answered with holes (structured, at least ``SPARSE_READ_MIN``, no DF)
        is served inline only when its data has no zero run as long as a file-system hole,
        where the sparse path's block status finds one data extent and sends the same
        single chunk. (A hole overlapping the range by less than ``_ZERO_RUN``, possible
        only with an unaligned raw ``offset``, is sent as data: valid, only less compact.)
        """
        sparse = req.length >= SPARSE_READ_MIN and self._structured() and not int(req.flags) & _DF
        data = export.node.submit_read(req.offset, req.length)
        if not isinstance(data, BUFFER_TYPES):
            if sparse:
                data.close()  # holds nothing until run: the sparse path reads by extents
                return self._sparse_or_plain_read(export, req)
            return self._finish_read(req, data)
        if sparse and (not isinstance(data, bytes | bytearray) or data.find(_ZERO_RUN) >= 0):
            return self._sparse_or_plain_read(export, req)
        self._write(self.conn.send_read(req.cookie, req.offset, data))
        return None

    async def _finish_write(self, req: Write, pending: Awaitable[None]) -> None:
        await pending
        self._write(self.conn.send_ok(req.cookie))
        await self.writer.drain()

    async def _finish_read(self, req: Read, pending: Awaitable[Buffer]) -> None:
        data = await pending
        self._write(self.conn.send_read(req.cookie, req.offset, data))
        await self.writer.drain()

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, ProtocolError) as exc:
            log.debug("NBD reply not sent: %s", exc)
            self._drop()

    async def _next_request(self) -> Event | None:
        """The next transmission event; None when the stream ended or broke."""
        try:
            return await self._next_event()
        except (ProtocolError, ConnectionError) as exc:
            log.debug("NBD client stream ended: %s", exc)
            return None

    async def _reply_error(self, cookie: int, error: NbdErrno, message: str = "") -> None:
        self._write(self.conn.send_error(cookie, error, message[:4096]))
        await self.writer.drain()

    async def _serve(
        self, export: NbdExport, req: Request, pending: Awaitable[None] | None
    ) -> None:
        """Run one request and reply; errors end up in the reply, never in the TaskGroup.

        ``pending``: what :meth:`_admit` left to await for a READ or WRITE (it replies).
        """
        try:
            try:
                if pending is not None:
                    await pending
                else:
                    await self._dispatch(export, req)
            except OSError as exc:
                code = exc.errno if exc.errno is not None else errno.EIO
                await self._reply_error(req.cookie, NbdErrno.from_host(code), exc.strerror or "")
            except ProtocolError:
                raise
            except Exception:
                log.exception("NBD request %r failed", req)
                await self._reply_error(req.cookie, NbdErrno.EIO, "internal error")
        except (ConnectionError, ProtocolError) as exc:
            log.debug("NBD reply not sent: %s", exc)
            self._drop()
        finally:
            self._slots.release()

    def _drop(self) -> None:
        self._dead = True
        self.writer.transport.abort()

    async def _dispatch(self, export: NbdExport, req: Request) -> None:
        """Serve a request other than READ and WRITE (those go through :meth:`_admit`)."""
        node = export.node
        conn = self.conn
        if isinstance(req, WriteZeroes):
            flags = WriteFlags.NONE
            if req.flags & CmdFlag.FUA:
                flags |= WriteFlags.FUA
            if not req.flags & CmdFlag.NO_HOLE:
                flags |= WriteFlags.MAY_UNMAP
            if req.flags & CmdFlag.FAST_ZERO:
                flags |= WriteFlags.NO_FALLBACK
            await node.write_zeroes(req.offset, req.length, flags)
        elif isinstance(req, Trim):
            await node.discard(req.offset, req.length)
            if req.flags & CmdFlag.FUA:
                await node.flush()
        elif isinstance(req, Flush):
            await node.flush()
        elif isinstance(req, Cache):
            pass  # advisory; every read goes to the node anyway
        elif isinstance(req, BlockStatus):
            await self._block_status(export, req)
            return
        else:  # pragma: no cover - the protocol layer knows no other request
            raise OSError(errno.EINVAL, "unknown request")
        self._write(conn.send_ok(req.cookie))
        await self.writer.drain()

    async def _sparse_or_plain_read(self, export: NbdExport, req: Read) -> None:
        """A READ that may be answered with holes: block status first, then the data."""
        node = export.node
        conn = self.conn
        pieces = await self._read_map(export, req.offset, req.length)
        if len(pieces) > 1 or pieces[0][2]:
            await self._sparse_read(export, req, pieces)
            return
        data = await node.read(req.offset, req.length)
        self._write(conn.send_read(req.cookie, req.offset, data))
        await self.writer.drain()

    async def _read_map(self, export: NbdExport, offset: int, length: int) -> list[list[Any]]:
        """Split a READ into [offset, length, is_zero] pieces with a few block-status calls."""
        node = export.node
        end = offset + length
        pieces: list[list[Any]] = []
        pos = offset
        while pos < end and len(pieces) < MAX_READ_EXTENTS:
            ext = await node.block_status(pos, end - pos)
            zero = ext.is_zero
            if pieces and pieces[-1][2] == zero:
                pieces[-1][1] += ext.length
            else:
                pieces.append([pos, ext.length, zero])
            pos = ext.end
        if pos < end:
            if pieces[-1][2]:
                pieces.append([pos, end - pos, False])
            else:
                pieces[-1][1] += end - pos
        return pieces

    async def _sparse_read(self, export: NbdExport, req: Read, pieces: list[list[Any]]) -> None:
        conn = self.conn
        last = len(pieces) - 1
        for i, (offset, length, zero) in enumerate(pieces):
            done = i == last
            if zero:
                self._write(
                    conn.send(
                        OffsetHole(cookie=req.cookie, offset=offset, length=length, done=done)
                    )
                )
            else:
                try:
                    data = await export.node.read(offset, length)
                except OSError as exc:
                    code = NbdErrno.from_host(exc.errno or errno.EIO)
                    chunk = ErrorChunk(
                        cookie=req.cookie,
                        error=code,
                        message=(exc.strerror or "")[:4096],
                        offset=offset,
                        done=True,
                    )
                    self._write(conn.send(chunk))
                    await self.writer.drain()
                    return
                self._write(
                    conn.send(OffsetData(cookie=req.cookie, offset=offset, data=data, done=done))
                )
            await self.writer.drain()

    async def _block_status(self, export: NbdExport, req: BlockStatus) -> None:
        if req.length == 0:
            raise OSError(errno.EINVAL, "empty block status request")
        one = bool(req.flags & CmdFlag.REQ_ONE)
        items = list(self._contexts.items())
        chunks: list[BlockStatusChunk] = []
        for i, (cid, name) in enumerate(items):
            if name == CONTEXT_BASE_ALLOCATION:
                extents = await self._allocation(export, req.offset, req.length, one, depth=False)
            elif name == CONTEXT_QEMU_ALLOCATION_DEPTH:
                extents = await self._allocation(export, req.offset, req.length, one, depth=True)
            elif name.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
                bitmap = export.bitmaps[name[len(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX) :]]
                extents = _dirty_extents(
                    bitmap.runs(req.offset, req.offset + req.length), req.offset, req.length, one
                )
            else:  # pragma: no cover - only our own contexts can be negotiated
                raise OSError(errno.EINVAL, f"unknown context {name}")
            chunks.append(
                BlockStatusChunk(
                    cookie=req.cookie, context_id=cid, extents=extents, done=i == len(items) - 1
                )
            )
        for chunk in chunks:
            self._write(self.conn.send(chunk))
        await self.writer.drain()

    async def _allocation(
        self, export: NbdExport, offset: int, length: int, one: bool, *, depth: bool
    ) -> tuple[Extent, ...]:
        node = export.node
        end = offset + length
        out: list[list[int]] = []
        pos = offset
        while pos < end and len(out) < MAX_EXTENTS:
            ext = await node.block_status(pos, end - pos)
            if depth:
                flags = 1 if ext.status & Status.ALLOCATED else 0
            else:
                flags = 0 if ext.status & Status.DATA else AllocationState.HOLE
                if ext.status & Status.ZERO:
                    flags |= AllocationState.ZERO
            if out and out[-1][1] == flags:
                out[-1][0] += ext.length
            else:
                out.append([ext.length, flags])
            pos = ext.end
            if one:
                break
        return tuple(Extent(n, f) for n, f in out)


def _dirty_extents(runs: Any, offset: int, length: int, one: bool) -> tuple[Extent, ...]:
    """Turn dirty runs into alternating clean/dirty extents covering the request."""
    end = offset + length
    out: list[list[int]] = []
    pos = offset

    def add(n: int, flags: int) -> None:
        if n <= 0:
            return
        if out and out[-1][1] == flags:
            out[-1][0] += n
        else:
            out.append([n, flags])

    for start, run_len in runs:
        s = max(start, offset)
        e = min(start + run_len, end)
        if e <= pos:
            continue
        add(s - pos, 0)
        add(e - max(s, pos), DirtyState.DIRTY)
        pos = e
        if pos >= end or len(out) >= MAX_EXTENTS:
            break
    if pos < end and len(out) < MAX_EXTENTS:
        add(end - pos, 0)
    if not out:
        out.append([length, 0])
    if one:
        out = out[:1]
    return tuple(Extent(n, f) for n, f in out)
