"""What the repository commands share: secrets, opening, errors, running a copy job.

Secrets never come from the command line: an environment variable (``--passphrase-env``),
a file (``--passphrase-file``, ``--key-file``), or a prompt when stdin is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import getpass
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from blockbackup.errors import BlockBackupError

EXIT_FAILED = 1
#: What stops a repository command as Ctrl-C does (see :func:`stop_signals`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")
SECRET_ID = "bb-repo-key"
#: The repository format's chunk size (docs/repository.md), the copy granularity.
CHUNK_SIZE = 64 * 1024


def add_repo_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo", required=True, metavar="PATH|s3://BUCKET/PREFIX", help="the repository"
    )
    add_storage_args(parser)


def add_storage_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Where an ``s3://`` repository is (``prefix``: "source-"/"dest-" for sync). Each can
    also come from the environment or ``~/.config/blockbackup/s3.toml`` (docs/repository.md);
    credentials come only from the standard AWS chain (environment, profile)."""
    what = f" of the {prefix.rstrip('-')}" if prefix else ""
    parser.add_argument(
        f"--{prefix}endpoint", metavar="URL", help=f"S3 endpoint URL{what} (s3:// only)"
    )
    parser.add_argument(f"--{prefix}region", metavar="REGION", help=f"S3 region{what}")
    parser.add_argument(
        f"--{prefix}s3-addressing-style",
        choices=("path", "virtual"),
        help=f"S3 addressing style{what} (default: path with --endpoint, else virtual)",
    )


def storage_options(args: argparse.Namespace, prefix: str = "") -> dict[str, str]:
    """The storage settings the arguments give, as ``open_backend`` and the repository
    nodes take them (absent ones left out)."""
    attr = prefix.replace("-", "_")
    values = {
        "endpoint": getattr(args, f"{attr}endpoint", None),
        "region": getattr(args, f"{attr}region", None),
        "addressing-style": getattr(args, f"{attr}s3_addressing_style", None),
    }
    return {k: v for k, v in values.items() if v}


def add_secret_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--passphrase-env VAR | --passphrase-file F | --key-file F (``prefix``: "new-")."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{prefix}passphrase-env", metavar="VAR", help="passphrase from $VAR")
    group.add_argument(f"--{prefix}passphrase-file", metavar="FILE", help="passphrase from FILE")
    group.add_argument(f"--{prefix}key-file", metavar="FILE", help="a key file's bytes")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def read_secret(
    args: argparse.Namespace, prefix: str = "", prompt: str = "Passphrase", confirm: bool = False
) -> tuple[bytes, str] | None:
    """(secret, slot kind) from the arguments, or a terminal prompt; None if none given
    and no terminal to ask."""
    attr = prefix.replace("-", "_")
    env = getattr(args, f"{attr}passphrase_env", None)
    pfile = getattr(args, f"{attr}passphrase_file", None)
    kfile = getattr(args, f"{attr}key_file", None)
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise BlockBackupError(f"environment variable {env} is not set or empty")
        return value.encode(), "passphrase"
    if pfile is not None:
        text = _read_file(pfile).rstrip(b"\r\n")
        if not text:
            raise BlockBackupError(f"passphrase file {pfile} is empty")
        return text, "passphrase"
    if kfile is not None:
        data = _read_file(kfile)
        if len(data) < 16:
            raise BlockBackupError(f"key file {kfile} is too short (at least 16 bytes)")
        return data, "key-file"
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass(f"{prompt}: ").encode()
    if not first:
        raise BlockBackupError("empty passphrase")
    if confirm and getpass.getpass(f"{prompt} (again): ").encode() != first:
        raise BlockBackupError("the passphrases differ")
    return first, "passphrase"


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BlockBackupError(f"cannot read {path}: {exc.strerror}") from None


def open_repository(args: argparse.Namespace) -> Any:
    """``args.repo``, opened with the secret the arguments give (one place for every
    command that reads a repository)."""
    from blockbackup.repository.repo import Repository  # lazy: start-up cost

    return Repository.open(args.repo, open_secret(args), storage_options(args))


def open_secret(args: argparse.Namespace) -> bytes | None:
    """The secret to open ``args.repo`` with (None for an unencrypted repository)."""
    from blockbackup.repository.errors import RepositoryError  # lazy: start-up cost
    from blockbackup.repository.repo import Repository  # lazy: start-up cost

    if not Repository.is_encrypted_at(args.repo, storage_options(args)):
        return None
    got = read_secret(args)
    if got is None:
        raise BlockBackupError(
            f"{args.repo} is encrypted: give --passphrase-env VAR, --passphrase-file FILE "
            "or --key-file FILE (or run on a terminal to be asked)"
        )
    if "://" not in args.repo:  # on object storage, reading the slots twice costs requests
        try:  # while the command imports the engine
            Repository.unlock_ahead(args.repo, got[0], storage_options(args))
        except (RepositoryError, OSError):
            pass  # the opening finds it again, and says so
    return got[0]


def secret_object(secret: bytes | None) -> dict[str, Any] | None:
    """The ``secret`` object-add options that carry ``secret`` to the repository nodes."""
    if secret is None:
        return None
    data = base64.b64encode(secret).decode()
    return {"qom-type": "secret", "id": SECRET_ID, "data": data, "format": "base64"}


class Terminated(Exception):
    """SIGTERM or SIGHUP stopped the command, which undid its work as for a Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stops:
    """The stop signals received while a command runs (see :func:`stop_signals`)."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        self.received: list[int] = []

    def note(self, signum: int, _frame: object = None) -> None:
        if not self.received:  # the first one says why; the others wait for the undoing
            self.received.append(signum)

    def check(self) -> None:
        """Raise :class:`Terminated` if one came (at a point where that is safe)."""
        if self.received:
            raise Terminated(self.received[0])


@contextlib.contextmanager
def stop_signals() -> Iterator[Stops]:
    """Inside, Ctrl-C (unless ignored, as in a script's background job), SIGTERM and SIGHUP
    are remembered, not acted on where the interpreter happens to be: an exception raised
    there can break what it interrupts (a class being created mid-import: measured). The
    command checks (:meth:`Stops.check`), and :func:`run_stoppable` turns one into a
    cancellation. Without this SIGTERM and SIGHUP killed a restore where it stood, leaving
    its half-written image (``timeout``, ``systemctl stop``, a closed terminal)."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    stops = Stops(STOP_SIGNALS if ignored else (signal.SIGINT, *STOP_SIGNALS))
    previous = {sig: signal.signal(sig, stops.note) for sig in stops.signals}
    try:
        yield stops
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_stoppable(main: Coroutine[Any, Any, T], stops: Stops) -> T:
    """``asyncio.run(main)``, stopped by the signals of ``stops`` as asyncio stops on a
    Ctrl-C: the main task is cancelled, so what it opened closes and what it made is
    undone; then :class:`Terminated` is raised. A signal that came before it ran stops it
    before it begins."""

    async def stoppable() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            if not stops.received:
                task.cancel()
            stops.note(signum)

        for sig in stops.signals:
            loop.add_signal_handler(sig, stop, sig)
        try:
            stops.check()
            return await main
        finally:
            main.close()  # unstarted if stopped before it began: nothing to undo
            for sig in stops.signals:
                loop.remove_signal_handler(sig)  # which leaves the default: ours again
                signal.signal(sig, stops.note)

    try:
        return asyncio.run(stoppable())
    except asyncio.CancelledError:
        stops.check()
        raise


@contextlib.contextmanager
def _terminating() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` where the command is, as Ctrl-C raises
    KeyboardInterrupt: a command that keeps no state a kill would break (verify, prune, gc,
    sync; each is safe to kill and run again) then says it was stopped instead of dying
    without a word. Commands with work to undo take them over (:func:`stop_signals`)."""

    def terminate(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, terminate) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One-line errors and exit status 1 instead of tracebacks, named by the command as
    every other command's are (``blockbackup restore: ...``); 128 + the signal's number
    after :class:`Terminated` or a Ctrl-C."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            with _terminating():
                return run(args)
        except Terminated as stopped:
            print(f"blockbackup {args.command}: interrupted ({stopped})", file=sys.stderr)
            return 128 + stopped.signum
        except KeyboardInterrupt:  # said as for the other signals, and as a live backup does
            print(f"blockbackup {args.command}: interrupted (SIGINT)", file=sys.stderr)
            return 128 + signal.SIGINT
        except (BlockBackupError, OSError) as exc:
            text = str(exc) if isinstance(exc, BlockBackupError) else (exc.strerror or str(exc))
            if isinstance(exc, OSError) and exc.filename:
                text = f"{exc.filename}: {text}"
            print(f"blockbackup {args.command}: {text}", file=sys.stderr)
            return EXIT_FAILED

    return wrapper


def requests_of(repo: Any) -> dict[str, int] | None:
    """The requests a remote repository's backend sent so far, by kind (GET, PUT, HEAD,
    LIST, DELETE; retries included), for ``--json`` output; None for a directory."""
    counter = getattr(repo.backend, "requests", None)
    return counter() if callable(counter) else None


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


async def copy_with_progress(
    bb: Any, source: str, target: str, label: str, quiet: bool, **job_options: Any
) -> None:
    """Run the backup job ``source`` -> ``target`` with a progress bar on a terminal
    (``job_options``: other ``bb.backup`` arguments than the default ``sync="full"``)."""
    from blockbackup.jobs.backup import BackupPerf  # lazy: start-up cost

    # The repository's chunk size, stated (a raw file target has no cluster size to ask);
    # few workers: the repository node handles one request at a time, so more would only
    # hold more buffers (64 workers: ~195 MiB RSS for a 256 MiB image, 8: see below)
    perf = BackupPerf(cluster_size=CHUNK_SIZE, max_workers=8)
    job = await bb.backup(source, target, perf=perf, **{"sync": "full", **job_options})
    waiter = asyncio.ensure_future(bb.wait(job))
    console = Console(stderr=True)
    with Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=0.25)
                progress.update(task, completed=job.progress_current, total=job.progress_total)
        finally:
            if not waiter.done():
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
    await waiter
