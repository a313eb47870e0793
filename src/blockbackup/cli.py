"""The ``blockbackup`` command line.

Subcommands:

- ``demo``: the built-in live-backup demonstration (the default).
- ``daemon``: a qemu-storage-daemon compatible daemon (``blockbackup daemon --help``).
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
    sub.add_parser("daemon", help="qemu-storage-daemon compatible daemon", add_help=False)
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
        return asyncio.run(run_demo(args.size, args.dir, args.speed, args.keep))
    raise AssertionError(command)  # pragma: no cover - argparse refuses unknown commands
