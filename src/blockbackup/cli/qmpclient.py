"""What every QMP-client subcommand shares: short connections, one-line errors, signals.

The commands are plain QMP clients (QEMU's own ``qemu.qmp``): they work against blockbackup
and against qemu-storage-daemon alike.

Why short connections with a timeout: a monitor serves one client at a time (like a QEMU
chardev socket), and a second client is accepted only when the first hangs up. So the
commands never hold the monitor longer than a query (``jobs`` keeps working while a backup
runs), and a monitor that another client holds shows up as a greeting that never comes:
after ``timeout`` seconds the command says so instead of hanging without a word.

Why signals only set a flag (:class:`StopSignals`): cancelling a task in the middle of a
``qemu.qmp`` call leaves the library's reader and writer tasks half torn down (``Task was
destroyed but it is pending!``). A command polls :meth:`StopSignals.wait` between calls
instead and undoes what it created, with every connection closed in order.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError

from blockbackup.cli.exitcodes import EXIT_FAILED, EXIT_USAGE

T = TypeVar("T")

#: Seconds to wait for a monitor's greeting (another client may hold the monitor).
DEFAULT_TIMEOUT = 10.0
#: Seconds between two tries to get into a monitor's full backlog.
BUSY_RETRY = 0.05
#: Sessions a daemon may end right after negotiating before it counts as gone.
NEGOTIATION_HANGUPS = 3
#: The signals that stop a command: Ctrl-C, ``kill``, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class CliError(Exception):
    """A failure reported as one line on stderr, after the command's name."""

    exit_code = EXIT_FAILED


class DaemonGone(CliError):
    """The daemon cannot be reached (no socket, refused, hung up): whatever it held went
    with it, so there is nothing left there to clean up."""


class UsageError(CliError):
    """Options that cannot work together, or do nothing (exit 2, like argparse)."""

    exit_code = EXIT_USAGE


class Stopped(Exception):
    """A signal asked the command to stop (raised at a point where that is safe)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def add_connect_argument(parser: Any, *, required: bool = True) -> None:
    """``--connect`` and ``--timeout``, worded the same for every command."""
    parser.add_argument(
        "--connect",
        required=required,
        metavar="QMP_SOCKET",
        help="the daemon's QMP monitor socket: the path `blockbackup serve` prints as "
        "'QMP monitor' (or a qemu-storage-daemon --chardev socket path)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the monitor when another client holds it "
        f"(default: {DEFAULT_TIMEOUT:g})",
    )


@dataclass(frozen=True)
class Monitor:
    """A daemon's QMP monitor: where it listens and how long to wait for it."""

    socket: str
    timeout: float = DEFAULT_TIMEOUT
    #: Signals that may interrupt waiting for the monitor (nothing was asked of it yet).
    stop: StopSignals | None = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[QMPClient]:
        """One connection, closed on the way out whatever happens inside."""
        client = await connect(self.socket, self.timeout, self.stop)
        try:
            yield client
        finally:
            await _disconnect(client)

    async def run(self, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
        """Run ``commands`` in order on one short connection; their return values."""
        async with self.session() as client:
            try:
                return [await client.execute(name, args) for name, args in commands]
            except (ExecInterruptedError, StateError, EOFError, OSError) as err:
                raise DaemonGone(f"lost the connection to the daemon at {self.socket}") from err

    async def execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        (result,) = await self.run((name, args))
        return result


def _connect_reason(err: ConnectError) -> str:
    cause = err.exc
    if isinstance(cause, FileNotFoundError):
        return (
            "no such socket (is it running? `blockbackup serve` prints its QMP socket; "
            "a QEMU's is the path given to -qmp)"
        )
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (the daemon that made this socket is gone)"
    if isinstance(cause, ConnectionResetError | BrokenPipeError):
        return "the daemon hung up (it is gone, or shutting down)"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(cause, EOFError):
        return "the daemon hung up before its greeting"
    return str(cause) or type(cause).__name__


async def _disconnect(client: QMPClient) -> None:
    """Hang up. ``disconnect`` re-raises whatever ended the connection's reader or writer
    (the daemon went away, a protocol error): that was reported by the call that saw it, or
    does not matter once the answers are in."""
    try:
        await client.disconnect()
    except Exception:  # see the docstring; CancelledError is not caught
        pass


#: Above every level: ``qemu.qmp`` says nothing unless ``--verbose``.
_SILENT = logging.CRITICAL + 1


def quiet_library_logs(verbose: bool) -> None:
    """``qemu.qmp`` logs every connect failure itself: the command says it once, itself.
    Its CRITICAL records too: a signal that cancels its disconnect while a socket error is
    pending makes it log a traceback as "a bug in the QMP library" (seen once in a fresh
    run, Ctrl-C on a connect to a full backlog), where the command says "interrupted"."""
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose else _SILENT)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP while a command runs: the first one is remembered, and
    the command stops at its next :meth:`check` or :meth:`wait`. Later ones change nothing:
    the command is already undoing what it made."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._event = asyncio.Event()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            self._event.set()

    def check(self) -> None:
        if self.signum is not None:
            raise Stopped(self.signum)

    async def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a signal comes: then raise :class:`Stopped`."""
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            return
        self.check()

    async def interrupt(self, aw: Awaitable[T]) -> T:
        """Await ``aw``, cancelled if a signal comes first (then raise :class:`Stopped`).

        Only for awaits with no effect to undo (waiting for a monitor). A signal that came
        before the call stops it at once; undoing is never interrupted because it runs
        with no :class:`StopSignals` at all (see ``Monitor.stop``).
        """
        if self.signum is not None:
            if inspect.iscoroutine(aw):
                aw.close()
            self.check()
        task = asyncio.ensure_future(aw)
        signalled = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, signalled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
            if not task.done():
                task.cancel()
            await asyncio.wait({task, signalled})
        if task.cancelled():
            self.check()
        return task.result()


def run_command(
    name: str, body: Callable[[StopSignals], Awaitable[int]], *, verbose: bool = False
) -> int:
    """Run a command's ``body``; every failure becomes one line on stderr and an exit code.

    ``body`` gets the :class:`StopSignals`; a :class:`Stopped` that escapes it exits with
    128 + the signal's number (130 for Ctrl-C).
    """
    # A signal from here until the loop's handlers are installed is remembered and stops
    # the command as one that comes later would (it gets no KeyboardInterrupt, and
    # asyncio.run installs no handler of its own). Before here, see ``cli.main``.
    early: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, _f: early.append(n)) for sig in STOP_SIGNALS}
    quiet_library_logs(verbose)

    async def main() -> int:
        stop = StopSignals()
        stop.install()
        if early:
            stop._received(early[0])
        return await body(stop)

    try:
        return asyncio.run(main())
    except Stopped as stopped:
        print(f"blockbackup {name}: interrupted ({stopped})", file=sys.stderr)
        return stopped.exit_code
    except CliError as err:
        print(f"blockbackup {name}: {err}", file=sys.stderr)
        return err.exit_code
    except ExecuteError as err:
        print(f"blockbackup {name}: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def connect(
    socket: str, timeout: float = DEFAULT_TIMEOUT, stop: StopSignals | None = None
) -> QMPClient:
    """A connected client (the caller disconnects it); errors as :class:`CliError`.

    A monitor listens with a backlog of one: while it serves a client, one more waits in
    the backlog and the next connect fails with EAGAIN, which asyncio reports as a
    connection made (the first read then fails with EINVAL). Both mean "busy": try again
    until ``timeout``, as for a greeting that does not come. A signal in ``stop`` ends the
    wait (:class:`Stopped`).

    A daemon that hangs up right after answering the capabilities negotiation makes
    ``qemu.qmp`` fail its own state assertion (AssertionError). qemu-storage-daemon has
    been seen to do that once right after it started, so that is tried again, a few times.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    hangups = 0
    while True:
        client = QMPClient("blockbackup")
        try:
            attempt = asyncio.wait_for(client.connect(socket), max(deadline - loop.time(), 0))
            await (stop.interrupt(attempt) if stop is not None else attempt)
            return client
        except TimeoutError:
            await _disconnect(client)  # collect what the cut-off attempt left running
            raise _held(socket, timeout) from None
        except AssertionError:
            await _disconnect(client)
            hangups += 1
            if hangups >= NEGOTIATION_HANGUPS:
                raise DaemonGone(
                    f"cannot connect to {socket}: the daemon hung up right after its greeting"
                ) from None
        except ConnectError as err:
            await _disconnect(client)
            if not _busy(err):
                raise DaemonGone(f"cannot connect to {socket}: {_connect_reason(err)}") from None
            if loop.time() >= deadline:
                raise _held(socket, timeout) from None
        await (stop.wait(BUSY_RETRY) if stop is not None else asyncio.sleep(BUSY_RETRY))


def _held(socket: str, timeout: float) -> CliError:
    return CliError(
        f"{socket}: another client holds the monitor (no greeting within {timeout:g} s); "
        "try again when it is done"
    )


def _busy(err: ConnectError) -> bool:
    return isinstance(err.exc, OSError) and err.exc.errno in (errno.EAGAIN, errno.EINVAL)


async def qmp(socket: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    """Run ``commands`` on one short connection (see :meth:`Monitor.run`)."""
    return await Monitor(socket).run(*commands)
