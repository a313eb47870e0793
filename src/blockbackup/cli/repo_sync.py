"""``blockbackup repo sync SRC DST``: copy a repository (directory or s3://) into another.

Without the key: packs are checked against their names as they are copied. Settings for
an ``s3://`` side: ``--endpoint``/``--region``/``--s3-addressing-style`` apply to both,
``--source-*``/``--dest-*`` to one side.
"""

from __future__ import annotations

import argparse
from typing import Any

from blockbackup.cli.repo_common import (
    add_json_arg,
    add_storage_args,
    emit,
    guarded,
    storage_options,
)
from blockbackup.cli.sizes import format_size, parse_size
from blockbackup.errors import BlockBackupError


def add_parser(cmds: Any) -> None:
    sync = cmds.add_parser(
        "sync", help="copy what DST lacks from SRC (directory or s3://), verified, resumable"
    )
    sync.add_argument("source", metavar="SRC", help="the repository to copy from")
    sync.add_argument("dest", metavar="DST", help="a copy of it, or a new empty place")
    add_storage_args(sync)
    add_storage_args(sync, prefix="source-")
    add_storage_args(sync, prefix="dest-")
    sync.add_argument(
        "--limit-rate",
        type=parse_size,
        metavar="BYTES/S",
        help="at most this many bytes per second (e.g. 20M)",
    )
    add_json_arg(sync)
    sync.set_defaults(run=run)


def _options(args: argparse.Namespace, side: str) -> dict[str, str]:
    return {**storage_options(args), **storage_options(args, prefix=f"{side}-")}


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.repository.backend import open_backend  # lazy: start-up cost
    from blockbackup.repository.sync import sync  # lazy: start-up cost

    rate = args.limit_rate
    if rate is not None and rate <= 0:
        raise BlockBackupError("--limit-rate must be positive")
    if args.source == args.dest:
        raise BlockBackupError("SRC and DST are the same place")
    src = open_backend(args.source, _options(args, "source"))
    dst = open_backend(args.dest, _options(args, "dest"))
    report = sync(src, dst, limit_rate=rate)
    text = (
        f"{'created' if report.created else 'updated'} {args.dest}: {report.packs} packs, "
        f"{report.indexes} indexes, {report.snapshots} snapshots, {report.keys} key slots "
        f"copied ({format_size(report.bytes)})"
    )
    emit(args, {"source": args.source, "dest": args.dest, **report.to_json()}, text)
    return 0
