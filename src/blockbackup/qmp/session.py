"""One QMP monitor: a listening socket and the session of its one connected client.

Why this shape (qemu.qmp's, server side): a session has a runstate-like mode
(capabilities negotiation, then command mode), sends the greeting, reads a byte stream
through :class:`~blockbackup.qmp.jsonstream.JsonStreamer` and answers each message in
order. Events reach it from the :class:`~blockbackup.events.EventBus` once negotiation is
done; before writing a reply the session first writes every event already emitted, so an
event caused by a command always precedes that command's reply (as QEMU sends
``JOB_STATUS_CHANGE created/running`` before the ``blockdev-backup`` return).

A monitor serves one client at a time, like a QEMU chardev socket: the next connection is
accepted only when the current one closed, so a second client waits (for its greeting).
Nothing a client sends can crash the daemon: protocol errors get QEMU's error replies,
and an unexpected exception in a handler becomes a ``GenericError`` reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from enum import Enum
from typing import Any

from blockbackup._sockets import bind_unix
from blockbackup.errors import BlockBackupError
from blockbackup.events import Event, EventSubscription
from blockbackup.qmp.commands.control import QMP_CAPABILITIES_ARGS, greeting
from blockbackup.qmp.context import Context, Services
from blockbackup.qmp.jsonstream import JsonParseError, JsonStreamer
from blockbackup.qmp.registry import CommandNotFoundError, check_request, dispatch

__all__ = ["ChardevSocket", "Monitor", "Session", "SessionMode"]

log = logging.getLogger(__name__)

READ_SIZE = 65536
#: Input is parsed this many bytes at a time, with a turn of the event loop after each
#: slice: a client that floods its monitor delays NBD requests and other monitors by at
#: most one slice's parsing (the streamer's work is proportional to its input).
INPUT_SLICE = 4096


class SessionMode(Enum):
    """Where a session is in the protocol."""

    NEGOTIATION = "capabilities negotiation"
    COMMAND = "command"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ChardevSocket:
    """A ``--chardev socket`` listener: a unix ``path`` or a TCP ``host``/``port``."""

    id: str
    path: str | None = None
    host: str | None = None
    port: int | None = None


class Session:
    """One client connection of a monitor."""

    def __init__(
        self,
        services: Services,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        pretty: bool = False,
    ) -> None:
        self.services = services
        self.reader = reader
        self.writer = writer
        self.pretty = pretty
        self.mode = SessionMode.NEGOTIATION
        self.oob = False
        self.streamer = JsonStreamer()
        self._events: EventSubscription | None = None

    def __repr__(self) -> str:
        return f"<Session mode={self.mode.value}>"

    # -- output --------------------------------------------------------------------------

    def _write(self, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, indent=4 if self.pretty else None)
        self.writer.write(text.encode() + b"\r\n")

    def _flush_events(self) -> None:
        if self._events is not None:
            for event in self._events.drain():
                self._write(event)

    async def _reply(self, obj: dict[str, Any]) -> None:
        self._flush_events()
        self._write(obj)
        await self.writer.drain()

    async def _pump_events(self, sub: EventSubscription) -> None:
        try:
            while True:
                event: Event = await sub.get()
                self._write(event)
                self._flush_events()
                await self.writer.drain()
        except ConnectionError:
            return

    # -- the session -----------------------------------------------------------------------

    async def run(self) -> None:
        """Greet, then serve until the client disconnects (or the session is cancelled)."""
        try:
            async with asyncio.TaskGroup() as tg:
                pump: asyncio.Task[None] | None = None
                self._write(greeting())
                await self.writer.drain()
                while True:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        break
                    view = memoryview(data)
                    for start in range(0, len(data), INPUT_SLICE):
                        for msg in self.streamer.feed(view[start : start + INPUT_SLICE]):
                            await self._handle(msg)
                            if pump is None and self._events is not None:
                                pump = tg.create_task(self._pump_events(self._events))
                        await asyncio.sleep(0)  # let the data path run (see INPUT_SLICE)
                if pump is not None:
                    pump.cancel()
        except* ConnectionError:
            pass
        finally:
            self.mode = SessionMode.CLOSED
            if self._events is not None:
                self._events.close()
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.writer.wait_closed())

    async def _handle(self, msg: Any) -> None:
        if isinstance(msg, JsonParseError):
            await self._reply({"error": {"class": "GenericError", "desc": msg.desc}})
            return
        ctx = Context(self.services)
        reply: dict[str, Any]
        try:
            result = await self._execute(msg, ctx)
        except BlockBackupError as exc:
            reply = {"error": {"class": exc.error_class, "desc": str(exc)}}
        except OSError as exc:
            reply = {"error": {"class": "GenericError", "desc": exc.strerror or str(exc)}}
        except Exception as exc:
            log.exception("command failed unexpectedly")
            reply = {"error": {"class": "GenericError", "desc": str(exc) or type(exc).__name__}}
        else:
            reply = {"return": result}
        if isinstance(msg, dict) and "id" in msg:
            reply["id"] = msg["id"]
        await self._reply(reply)
        for hook in ctx.after_reply:
            hook()

    async def _execute(self, msg: Any, ctx: Context) -> Any:
        req = check_request(msg, oob_enabled=self.oob)
        if self.mode is SessionMode.NEGOTIATION:
            if req.name != "qmp_capabilities" or req.oob:
                raise CommandNotFoundError(
                    "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            args = QMP_CAPABILITIES_ARGS.check(req.arguments, "")
            self.oob = "oob" in args.get("enable", [])
            self.mode = SessionMode.COMMAND
            self._events = self.services.events.subscribe()
            return {}
        async with self.services.lock:
            return await dispatch(self.services.registry, ctx, req)


class Monitor:
    """A ``--monitor``: listens on its chardev and serves one session at a time."""

    def __init__(self, services: Services, chardev: ChardevSocket, *, pretty: bool = False):
        self.services = services
        self.chardev = chardev
        self.pretty = pretty
        self._sock: socket.socket | None = None
        self.session: Session | None = None

    def listen(self) -> None:
        """Bind and listen now (errors fail the command line option)."""
        cd = self.chardev
        if cd.path is not None:
            self._sock = bind_unix(cd.path)
        else:
            host = cd.host or "127.0.0.1"
            try:
                sock = socket.create_server((host, cd.port or 0), reuse_port=False)
            except OSError as exc:
                raise BlockBackupError(
                    f"Failed to bind socket to {host}:{cd.port}: {exc.strerror}"
                ) from exc
            self._sock = sock
        self._sock.listen(1)
        self._sock.setblocking(False)

    @property
    def address(self) -> Any:
        assert self._sock is not None
        return self._sock.getsockname()

    async def serve(self) -> None:
        """Accept and serve clients, one after the other, until cancelled."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn, _ = await loop.sock_accept(self._sock)
                try:
                    reader, writer = await asyncio.open_connection(sock=conn, limit=READ_SIZE)
                except OSError:
                    conn.close()
                    continue
                self.session = Session(self.services, reader, writer, pretty=self.pretty)
                try:
                    await self.session.run()
                except Exception:
                    log.exception("monitor session failed")
                finally:
                    self.session = None
        finally:
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self.chardev.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.chardev.path)
