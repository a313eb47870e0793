"""``blockbackup backup --connect QMP NODE TARGET``: a live backup of a served node to a file;
``blockbackup backup IMAGE --repo R``: an image at rest into a repository.

The command line: its options, their help, and the checks of what cannot work together
before anything is asked of the daemon. One run itself is :mod:`blockbackup.cli.backup_run`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from blockbackup.cli.backup_run import BackupRequest, backup
from blockbackup.cli.exitcodes import EXIT_USAGE
from blockbackup.cli.progress import Output
from blockbackup.cli.qmpclient import Monitor, StopSignals, add_connect_argument, run_command
from blockbackup.cli.repo_common import add_secret_args, add_storage_args
from blockbackup.cli.sizes import parse_size

_DESCRIPTION = """\
Back up NODE of a running daemon (`blockbackup serve`, `blockbackup daemon` or
qemu-storage-daemon) to TARGET, a new file, while the disk stays in use: the backup is the
disk as it was when the backup started. The file appears under its name only once it is
complete and on disk; Ctrl-C (or SIGTERM, SIGHUP) cancels the job and leaves nothing.
"""

_EPILOG = """\
NODE is the node name of the disk in the daemon: `blockbackup serve disk.img` names it
`disk` (it prints `disk: nbd+unix:///disk?...`); `blockbackup bitmaps --connect Q list`
and QMP's query-named-block-nodes list them.

With --repo, the one argument is an IMAGE at rest (raw or qcow2, not in use), backed up
into the repository as a new snapshot (`blockbackup snapshots --repo R` lists them).

Incrementals: a full backup with --start-bitmap NAME starts tracking changes at its point in
time; each later backup with --incremental NAME --format qcow2 --backing PREVIOUS copies only
what changed since the last good one, into a qcow2 image that reads through to PREVIOUS.
"""


def add_parser(sub: Any) -> None:
    backup = sub.add_parser(
        "backup",
        help="back up a node of a running daemon to a file",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connect_argument(backup, required=False)
    backup.add_argument(
        "node", metavar="NODE", help="the node to back up (see below); with --repo: IMAGE"
    )
    backup.add_argument(
        "target", metavar="TARGET", nargs="?", help="the backup file to create (not with --repo)"
    )
    backup.add_argument("--repo", metavar="PATH", help="back up IMAGE into this repository")
    add_storage_args(backup)
    backup.add_argument("--name", help="with --repo: the disk's name (default: IMAGE's base name)")
    backup.add_argument(
        "--base",
        default="latest",
        help="with --repo: the snapshot to compare with: latest (default), an id, or none",
    )
    add_secret_args(backup)
    backup.add_argument(
        "--format", choices=("raw", "qcow2"), default="raw", help="target format (default: raw)"
    )
    backup.add_argument(
        "--sync",
        choices=("full", "top", "none"),
        default="full",
        help="full: the whole disk (default); top: only what the source's top layer "
        "allocates (a qcow2 overlay; the same as full for a raw image). For only what "
        "changed, see --incremental. 'none' is refused: it copies nothing by itself",
    )
    backup.add_argument(
        "--speed", type=parse_size, default=0, metavar="SIZE", help="per second (default: no limit)"
    )
    backup.add_argument(
        "--force", action="store_true", help="replace an existing TARGET (whole, never reused)"
    )
    backup.add_argument(
        "--job-id", metavar="ID", help="the job's id (default: a new one per run, bb-PID-XXXXXX)"
    )
    backup.add_argument(
        "--backing", metavar="FILE", help="with --incremental: the previous backup in the chain"
    )
    backup.add_argument(
        "--incremental", metavar="BITMAP", help="copy only what BITMAP marks (needs --backing)"
    )
    backup.add_argument(
        "--start-bitmap",
        metavar="BITMAP",
        help="start (or restart) BITMAP at this backup's point in time, for incrementals; "
        "it is persistent (survives a restart of the daemon) where the node can store it",
    )
    persistence = backup.add_mutually_exclusive_group()
    persistence.add_argument(
        "--persistent",
        dest="persistent",
        action="store_const",
        const=True,
        help="with --start-bitmap: fail if the bitmap cannot be persistent",
    )
    persistence.add_argument(
        "--no-persistent",
        dest="persistent",
        action="store_const",
        const=False,
        help="with --start-bitmap: a bitmap in memory only (lost when the daemon stops)",
    )
    backup.add_argument("--json", action="store_true", help="print the result as JSON")
    backup.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.repo is not None:
        return _run_into_repository(args)
    if args.connect is None or args.target is None:
        print(
            "blockbackup backup: give --connect QMP_SOCKET NODE TARGET (a live disk to a file)"
            " or IMAGE --repo PATH (an image at rest into a repository)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    request = BackupRequest(
        node=args.node,
        target=args.target,
        fmt=args.format,
        sync=args.sync,
        speed=args.speed,
        force=args.force,
        job_id=args.job_id,
        backing=args.backing,
        incremental=args.incremental,
        start_bitmap=args.start_bitmap,
        persistent=args.persistent,
    )

    async def body(stop: StopSignals) -> int:
        monitor = Monitor(args.connect, args.timeout, stop)
        request.check()
        return await backup(monitor, request, stop, Output(as_json=args.json))

    return run_command("backup", body, verbose=args.verbose)


def _run_into_repository(args: argparse.Namespace) -> int:
    if args.connect is not None or args.target is not None:
        print(
            "blockbackup backup: with --repo, give only IMAGE (an image at rest); live disks "
            "(--connect) into a repository are not built yet: back them up to a file",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from blockbackup.cli import repo_backup  # lazy: start-up cost (the engine)

    args.image = args.node
    return repo_backup.run(args)
