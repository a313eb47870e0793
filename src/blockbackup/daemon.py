"""The daemon: one block graph, its jobs, exports and QMP monitors, under one TaskGroup.

Why one owner: shutdown must happen in one order whatever triggers it (``quit``, SIGINT,
SIGTERM): jobs are cancelled (their events still reach the monitors), exports are
removed, the NBD server stops, every image is flushed and closed, the monitors close and
the process exits 0. Startup runs the command-line options in order through the same
handlers as the QMP commands (``--blockdev`` is ``blockdev-add``, ``--export`` is
``block-export-add``...), as qemu-storage-daemon does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from blockbackup import __version__
from blockbackup.block.dirty_bitmap import find_bitmap
from blockbackup.block.graph import CloseError, Graph
from blockbackup.daemon_options import USAGE, DaemonOption, OptionsError, parse_args
from blockbackup.errors import BlockBackupError
from blockbackup.events import EventBus
from blockbackup.jobs.job import JobManager
from blockbackup.nbd.exports import ExportManager
from blockbackup.nbd.server import NbdServer
from blockbackup.qmp import commands as _commands  # noqa: F401  (declares the commands)
from blockbackup.qmp.commands.exports import NBD_SERVER_OPTIONS, nbd_server_start
from blockbackup.qmp.context import Context, Services
from blockbackup.qmp.registry import REGISTRY, Request, dispatch
from blockbackup.qmp.schema import BOOL, INT, STR, Enum, Member, Struct
from blockbackup.qmp.session import ChardevSocket, Monitor
from blockbackup.repository import drivers as _repo_drivers  # noqa: F401  (bb-repo-* nodes)

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

CHARDEV_SOCKET = Struct(
    "ChardevSocketOptions",
    [
        Member("backend", Enum("ChardevBackendKind", ("socket",))),
        Member("id", STR),
        Member("path", STR, optional=True),
        Member("host", STR, optional=True),
        Member("port", INT, optional=True),
        Member("server", BOOL, default=False),
        Member("wait", BOOL, default=True),
        Member("telnet", BOOL, optional=True),
    ],
)
MONITOR_OPTIONS = Struct(
    "MonitorOptions",
    [
        Member("id", STR, optional=True),
        Member("mode", Enum("MonitorMode", ("readline", "control")), default="control"),
        Member("pretty", BOOL, default=False),
        Member("chardev", STR),
    ],
)


class Daemon:
    """A blockbackup daemon; :meth:`run` serves until ``quit`` or a signal."""

    def __init__(self, command: str = "daemon") -> None:
        #: The command that runs this daemon, which names its errors (``blockbackup serve:``
        #: when ``serve`` runs it: the user typed ``serve``, not ``daemon``).
        self.command = command
        self.events = EventBus()
        self.graph = Graph()
        self.jobs = JobManager(self.events)
        self.exports = ExportManager(self.graph, self.events, bitmap_lookup=find_bitmap)
        self.nbd = NbdServer(self.exports)
        self.services = Services(
            graph=self.graph,
            events=self.events,
            jobs=self.jobs,
            exports=self.exports,
            nbd=self.nbd,
            registry=REGISTRY,
            request_shutdown=self.request_shutdown,
        )
        self.monitors: list[Monitor] = []
        self._chardevs: dict[str, ChardevSocket] = {}
        self._shutdown = asyncio.Event()

    def request_shutdown(self) -> None:
        """Make :meth:`run` shut down (``quit``, signals); returns at once."""
        self._shutdown.set()

    async def execute(self, name: str, args: dict[str, Any], *, keyval: bool = False) -> Any:
        """Run QMP command ``name`` through the registry's dispatch, as a monitor does
        (same lookup, validation and serialisation); the command line uses it too."""
        ctx = Context(self.services)
        async with self.services.lock:
            result = await dispatch(
                self.services.registry, ctx, Request(name, args, oob=False), keyval=keyval
            )
        for hook in ctx.after_reply:
            hook()
        return result

    async def process_option(self, opt: DaemonOption) -> None:
        """One command-line option, as qemu-storage-daemon processes it."""
        value, keyval = opt.value, opt.keyval
        if opt.name == "blockdev":
            await self.execute("blockdev-add", value, keyval=keyval)
        elif opt.name == "object":
            await self.execute("object-add", value, keyval=keyval)
        elif opt.name == "export":
            await self.execute("block-export-add", value, keyval=keyval)
        elif opt.name == "nbd-server":
            checked = NBD_SERVER_OPTIONS.check(value, "", keyval=keyval)
            await nbd_server_start(Context(self.services), checked)
        elif opt.name == "chardev":
            self._add_chardev(CHARDEV_SOCKET.check(value, "", keyval=True))
        elif opt.name == "monitor":
            self._add_monitor(MONITOR_OPTIONS.check(value, "", keyval=keyval))
        else:  # pragma: no cover - parse_args knows the same names
            raise OptionsError(f"unknown option --{opt.name}")

    def _add_chardev(self, args: dict[str, Any]) -> None:
        if args["id"] in self._chardevs:
            raise BlockBackupError(f"attempt to add duplicate property '{args['id']}' to object")
        if not args["server"] or args["wait"]:
            raise BlockBackupError("chardev: only server=on,wait=off sockets are supported")
        if "path" in args:
            chardev = ChardevSocket(args["id"], path=args["path"])
        elif "host" in args or "port" in args:
            chardev = ChardevSocket(args["id"], host=args.get("host"), port=args.get("port"))
        else:
            raise BlockBackupError("chardev: socket needs either 'path' or 'host'/'port'")
        self._chardevs[args["id"]] = chardev

    def _add_monitor(self, args: dict[str, Any]) -> None:
        chardev = self._chardevs.get(args["chardev"])
        if chardev is None:
            raise BlockBackupError(f'chardev "{args["chardev"]}" not found')
        if args["mode"] != "control":
            raise BlockBackupError("Only QMP is supported")
        if any(m.chardev is chardev for m in self.monitors):
            raise BlockBackupError(f"Device '{chardev.id}' is in use")
        monitor = Monitor(self.services, chardev, pretty=args["pretty"])
        monitor.listen()
        self.monitors.append(monitor)

    async def run(
        self,
        options: list[DaemonOption],
        *,
        pidfile: str | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> int:
        """Process ``options`` in order, then serve until shut down; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_shutdown)
        pid_written = False
        # Nothing is served before the whole command line is processed (a client that
        # connects early waits in the listen backlog): monitors start below, NBD is held.
        self.nbd.hold()
        try:
            try:
                for opt in options:
                    await self.process_option(opt)
                if pidfile is not None:
                    _write_pidfile(pidfile)
                    pid_written = True
            except BlockBackupError as exc:
                print(f"blockbackup {self.command}: {exc.for_people()}", file=sys.stderr)
                return 1
            await self.nbd.release()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(m.serve(), name=f"monitor {m.chardev.id}") for m in self.monitors
                ]
                if on_ready is not None:
                    on_ready()
                await self._shutdown.wait()
                status = await self._close_state()
                for task in tasks:
                    task.cancel()
            return status
        finally:
            await self._close_state()
            for monitor in self.monitors:
                monitor.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if pid_written and pidfile is not None:
                with contextlib.suppress(OSError):
                    os.unlink(pidfile)

    async def _close_state(self) -> int:
        """Cancel jobs, remove exports, stop NBD, flush and close every image.

        Returns the exit status: 1 when an image's final flush failed (its data may not
        be on disk, which whoever runs the daemon must learn), else 0.
        """
        await self.jobs.aclose()
        if self.nbd.running:
            await self.nbd.stop()
        else:
            self.exports.close_all()
        status = 0
        try:
            await self.graph.aclose()
        except CloseError as exc:
            print(f"blockbackup {self.command}: {exc}", file=sys.stderr)
            status = 1
        return status


def _write_pidfile(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise BlockBackupError(f"cannot create PID file: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def main(argv: list[str]) -> int:
    """``blockbackup daemon ARGS``: parse, optionally daemonize, run; the exit status."""
    try:
        args = parse_args(argv)
    except OptionsError as exc:
        print(f"blockbackup daemon: {exc}", file=sys.stderr)
        return 1
    if args.help:
        print(USAGE, end="")
        return 0
    if args.version:
        print(f"blockbackup daemon {__version__} (qemu-storage-daemon 7.2 compatible)")
        return 0
    ready_fd: int | None = None
    if args.daemonize:
        read_end, ready_fd = os.pipe()
        if os.fork() > 0:
            # Parent: exit once the child reports that startup completed.
            os.close(ready_fd)
            with os.fdopen(read_end, "rb") as pipe:
                ok = pipe.read(1) == b"\0"
            return 0 if ok else 1
        os.close(read_end)
        os.setsid()

    def on_ready() -> None:
        nonlocal ready_fd
        if ready_fd is None:
            return
        os.write(ready_fd, b"\0")
        os.close(ready_fd)
        ready_fd = None
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    async def run() -> int:
        return await Daemon().run(args.options, pidfile=args.pidfile, on_ready=on_ready)

    return asyncio.run(run())
