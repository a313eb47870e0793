"""The ``blockbackup`` command line.

Subcommands:

- ``demo``: the built-in live-backup demonstration (the default): serve + NBD writers +
  backup, with a proof of the point in time; ``--library`` runs it in-process instead.
- ``daemon``: a qemu-storage-daemon compatible daemon (``blockbackup daemon --help``).
- ``serve IMAGE...``: export images over NBD, with a QMP monitor (the simple way in).
- ``backup --connect QMP NODE TARGET``: back up a served node to a file, with progress.
- ``jobs --connect QMP``: list the jobs.
- ``bitmaps --connect QMP list|add|remove [NODE NAME]``: dirty bitmaps for incrementals.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from blockbackup import __version__


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``4096``: a size in bytes with QEMU-style suffixes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = text[-1:] if text[-1:] in units else ""
    try:
        value = float(text[: len(text) - len(suffix)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative")
    return int(value * units[suffix])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockbackup", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"blockbackup {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
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
    sub.add_parser("daemon", help="qemu-storage-daemon compatible daemon", add_help=False)
    serve = sub.add_parser("serve", help="export images over NBD, with a QMP monitor")
    serve.add_argument("images", nargs="+", metavar="IMAGE")
    serve.add_argument("--listen", metavar="HOST:PORT", help="NBD over TCP (default: unix socket)")
    serve.add_argument("--dir", help="where to create the sockets (default: a new temp dir)")
    serve.add_argument("--read-only", action="store_true", help="export read-only")
    serve.add_argument("--json", action="store_true", help="print the URIs as JSON")
    backup = sub.add_parser("backup", help="back up a node of a running daemon to a file")
    backup.add_argument("--connect", required=True, metavar="QMP_SOCKET")
    backup.add_argument("node", metavar="NODE")
    backup.add_argument("target", metavar="TARGET_FILE")
    backup.add_argument("--speed", type=parse_size, default=0, help="bytes/s (default: no limit)")
    backup.add_argument("--sync", choices=("full", "top", "none"), default="full")
    backup.add_argument("--job-id", default="backup0")
    backup.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="target format")
    backup.add_argument("--backing", metavar="FILE", help="qcow2 target: the previous backup")
    backup.add_argument("--incremental", metavar="BITMAP", help="copy only what BITMAP marks")
    backup.add_argument(
        "--start-bitmap", metavar="BITMAP", help="start BITMAP at this backup's point in time"
    )
    backup.add_argument("--persistent", action="store_true", help="with --start-bitmap")
    backup.add_argument("--json", action="store_true", help="print the result as JSON")
    bitmaps = sub.add_parser("bitmaps", help="list, add or remove dirty bitmaps")
    bitmaps.add_argument("--connect", required=True, metavar="QMP_SOCKET")
    bitmaps.add_argument("action", choices=("list", "add", "remove"))
    bitmaps.add_argument("node", nargs="?", metavar="NODE")
    bitmaps.add_argument("name", nargs="?", metavar="NAME")
    bitmaps.add_argument("--persistent", action="store_true")
    bitmaps.add_argument("--granularity", type=parse_size)
    bitmaps.add_argument("--json", action="store_true", help="print JSON")
    jobs = sub.add_parser("jobs", help="list the jobs of a running daemon")
    jobs.add_argument("--connect", required=True, metavar="QMP_SOCKET")
    jobs.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["daemon"]:
        from blockbackup.daemon import main as daemon_main

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return daemon_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    command = args.command or "demo"
    if command == "demo":
        from blockbackup.demo import run_demo

        if args.command is None:
            args = build_parser().parse_args(["demo"])
        if args.library:
            return asyncio.run(run_demo(args.size, args.dir, args.speed, args.keep))
        from blockbackup.demo_e2e import run as run_e2e

        return asyncio.run(run_e2e(args.size, args.speed, args.keep, args.dir))
    from blockbackup import usercli

    if command == "serve":
        return asyncio.run(
            usercli.serve(
                args.images,
                listen=args.listen,
                directory=args.dir,
                read_only=args.read_only,
                as_json=args.json,
            )
        )
    if command == "backup":
        request = usercli.BackupRequest(
            node=args.node,
            target_file=args.target,
            speed=args.speed,
            sync=args.sync,
            job_id=args.job_id,
            target_format=args.format,
            backing=args.backing,
            incremental=args.incremental,
            start_bitmap=args.start_bitmap,
            persistent=args.persistent,
        )
        return usercli.run_interruptible(
            usercli.backup_command(args.connect, request, as_json=args.json)
        )
    if command == "bitmaps":
        return asyncio.run(
            usercli.bitmaps_command(
                args.connect,
                args.action,
                args.node,
                args.name,
                persistent=args.persistent,
                granularity=args.granularity,
                as_json=args.json,
            )
        )
    if command == "jobs":
        return asyncio.run(usercli.jobs_command(args.connect, as_json=args.json))
    raise AssertionError(command)  # pragma: no cover - argparse refuses unknown commands
