"""blockbackup: live, point-in-time backups of disk images, served over NBD and QMP.

The command line: one parser, each subcommand in its own module. Subcommands:

- ``demo``: the built-in live-backup demonstration (the default): serve + NBD writers +
  backup, with a proof of the point in time; ``--library`` runs it in-process instead.
- ``daemon``: a qemu-storage-daemon compatible daemon (``blockbackup daemon --help``).
- ``serve IMAGE...``: export images over NBD, with a QMP monitor (the simple way in).
- ``backup --connect QMP NODE TARGET``: back up a served node to a file, with progress.
- ``jobs --connect QMP``: list the jobs.
- ``bitmaps --connect QMP list|add|remove [NODE NAME]``: dirty bitmaps for incrementals.
- ``repo init|key|backup``, ``snapshots``, ``restore``, ``verify``, ``prune``, ``gc``,
  ``mount``: the backup repository
  (docs/repository.md).
- ``vm backup|checkpoints|restore``: pull backups of a running QEMU's disks (docs/vm-backup.md).

Each subcommand module has ``add_parser(sub)``, which sets ``run`` as the parser's default:
``command`` dispatches through it, so adding a command touches its own module and one line here.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Sequence

from blockbackup import __version__
from blockbackup.cli import (
    backup,
    bitmaps,
    gc,
    jobs,
    mount,
    prune,
    repo,
    restore,
    serve,
    snapshots,
    verify,
    vm,
)
from blockbackup.cli.sizes import parse_size

SUBCOMMANDS = (serve, backup, jobs, bitmaps, repo, snapshots, restore, verify, prune, gc, mount, vm)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="live backup of a disk image that is being written")
    demo.add_argument("--size", type=parse_size, default=parse_size("256M"), help="image size")
    demo.add_argument("--dir", help="where to put the images (default: a temporary dir)")
    demo.add_argument("--speed", type=parse_size, default=0, help="backup rate limit, bytes/s")
    demo.add_argument("--keep", action="store_true", help="keep the images")
    demo.add_argument(
        "--library",
        action="store_true",
        help="run in-process through the Python API instead of serve + backup + NBD",
    )
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    # Lazy imports (here and for the daemon): start-up cost only. The CLI's QMP-client
    # commands import no block/ module; the demos and the daemon pull in the whole engine.
    if args.library:
        from blockbackup.demo import run_demo  # lazy: start-up cost

        return asyncio.run(run_demo(args.size, args.dir, args.speed, args.keep))
    from blockbackup.demo_e2e import run as run_e2e  # lazy: start-up cost

    return asyncio.run(run_e2e(args.size, args.speed, args.keep, args.dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockbackup", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"blockbackup {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
    _add_demo(sub)
    sub.add_parser("daemon", help="qemu-storage-daemon compatible daemon", add_help=False)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def command(argv: Sequence[str] | None = None) -> Callable[[], int]:
    """The command ``argv`` asks for, parsed and ready to run (argparse exits here on a
    usage error): the start-up that ``cli.main`` runs before the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["daemon"]:
        from blockbackup.daemon import main as daemon_main  # lazy: start-up cost

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return functools.partial(daemon_main, argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *argv])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[argparse.Namespace], int] = args.run
    return functools.partial(run, args)
