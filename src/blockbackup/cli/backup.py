"""``blockbackup backup --connect QMP NODE TARGET``: a live backup of a served node to a file;
``blockbackup backup IMAGE --repo R``: an image at rest into a repository.

The command line: its options, their help, and the checks of what cannot work together
before anything is asked of the daemon. One run itself is :mod:`blockbackup.cli.backup_run`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

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
into the repository as a new snapshot (`blockbackup snapshots --repo R` lists them). With
--connect and --repo, the arguments are live NODEs, backed up at one point in time into
one snapshot (disk names: the node names, or --name NODE=NAME). --start-bitmap NAME starts
a checkpoint with the snapshot; --incremental NAME then reads only what changed since the
latest snapshot of each disk, or the whole disk (saying why) when its checkpoint cannot be
trusted.

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
        "node",
        metavar="NODE",
        nargs="+",
        help="the node to back up, then TARGET, the backup file to create (see below); "
        "with --repo: IMAGE, or with --connect one or more NODEs",
    )
    backup.add_argument(
        "--repo", metavar="PATH", help="back up IMAGE, or the live NODEs, into this repository"
    )
    backup.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="with --repo: the disk's name (default: IMAGE's base name, or the node name); "
        "for several live nodes NODE=NAME, once per node to rename",
    )
    add_storage_args(backup)
    backup.add_argument(
        "--base",
        default=None,
        help="with IMAGE --repo: the snapshot to compare with: latest (default), an id, or none",
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
    positional = args.node
    if args.connect is None or len(positional) != 2:
        print(
            "blockbackup backup: give --connect QMP_SOCKET NODE TARGET (a live disk to a file),"
            " --connect QMP_SOCKET NODE... --repo PATH (live disks into a repository)"
            " or IMAGE --repo PATH (an image at rest into a repository)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.name or args.base is not None:
        flag = "--name" if args.name else "--base"
        print(f"blockbackup backup: {flag} is for backups into a repository", file=sys.stderr)
        return EXIT_USAGE
    args.node, args.target = positional
    from blockbackup.cli.backup_run import BackupRequest, backup  # lazy: the engine's start-up

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


def _usage(message: str) -> int:
    print(f"blockbackup backup: {message}", file=sys.stderr)
    return EXIT_USAGE


def _run_into_repository(args: argparse.Namespace) -> int:
    if args.connect is not None:
        return _run_live_into_repository(args)
    if len(args.node) != 1:
        return _usage(
            "with --repo, give one IMAGE (an image at rest), or --connect QMP_SOCKET and the "
            "live NODEs"
        )
    for flag, value in _FILE_ONLY.items():
        if getattr(args, value) not in (None, False, "raw", "full", 0):
            return _usage(f"{flag} is for live backups (--connect), not for an image at rest")
    from blockbackup.cli import repo_backup  # lazy: start-up cost (the engine)

    args.image = args.node[0]
    args.name = args.name[-1] if args.name else None
    args.base = args.base or "latest"
    return repo_backup.run(args)


#: Options of a backup to a file, and the attribute each sets.
_FILE_ONLY = {
    "--incremental": "incremental",
    "--start-bitmap": "start_bitmap",
    "--persistent/--no-persistent": "persistent",
    "--speed": "speed",
}


def _run_live_into_repository(args: argparse.Namespace) -> int:
    """``backup --connect Q NODE... --repo R``: see :mod:`blockbackup.cli.repo_live`."""
    for flag, value, default in (
        ("--format", args.format, "raw"),
        ("--sync", args.sync, "full"),
        ("--force", args.force, False),
        ("--job-id", args.job_id, None),
        ("--backing", args.backing, None),
        ("--base", args.base, None),
    ):
        if value != default:
            return _usage(
                f"{flag} does not apply to a backup into a repository (the repository stores "
                "chunks; each disk starts from its latest snapshot)"
            )
    nodes = tuple(args.node)
    if len(set(nodes)) != len(nodes):
        return _usage("a node is named twice")
    names = _disk_names(nodes, args.name or [])
    if isinstance(names, str):
        return _usage(names)
    if args.incremental is not None and args.start_bitmap is not None:
        return _usage(
            "--incremental BITMAP already starts the next checkpoint of BITMAP; "
            "--start-bitmap is for full backups"
        )
    if args.persistent is not None and args.incremental is None and args.start_bitmap is None:
        flag = "--persistent" if args.persistent else "--no-persistent"
        return _usage(f"{flag} only applies with --start-bitmap or --incremental")
    for series in (args.incremental, args.start_bitmap):
        if series is not None and "@" in series:
            return _usage(f"bitmap name {series!r}: '@' is reserved for checkpoints")
    from blockbackup.cli import repo_live  # lazy: start-up cost
    from blockbackup.cli.repo_common import open_secret, storage_options  # lazy: start-up cost
    from blockbackup.errors import BlockBackupError  # lazy: start-up cost

    try:
        secret = open_secret(args)
    except (BlockBackupError, OSError) as exc:
        print(f"blockbackup backup: {exc}", file=sys.stderr)
        return 1
    request = repo_live.LiveRequest(
        nodes=nodes,
        names=names,
        repo=args.repo,
        secret=secret,
        incremental=args.incremental,
        start_bitmap=args.start_bitmap,
        persistent=args.persistent,
        speed=args.speed,
        storage=storage_options(args),
    )

    async def body(stop: StopSignals) -> int:
        monitor = Monitor(args.connect, args.timeout, stop)
        return await repo_live.backup_live(monitor, request, stop, Output(as_json=args.json))

    return run_command("backup", body, verbose=args.verbose)


def _disk_names(nodes: tuple[str, ...], given: list[str]) -> tuple[str, ...] | str:
    """Each node's disk name: the node's own unless ``--name NODE=NAME`` (or, for one
    node, ``--name NAME``) says otherwise; a text for what is wrong."""
    names = dict(zip(nodes, nodes, strict=True))
    for item in given:
        node, eq, name = item.rpartition("=")
        if not eq:
            if len(nodes) != 1:
                return f"--name {item}: with several nodes, say which: --name NODE=NAME"
            node = nodes[0]
        if node not in names:
            return f"--name {item}: {node} is not one of the nodes to back up"
        if not name:
            return f"--name {item}: empty disk name"
        names[node] = name
    out = tuple(names[n] for n in nodes)
    if len(set(out)) != len(out):
        return "two disks would have the same name in the snapshot"
    return out
