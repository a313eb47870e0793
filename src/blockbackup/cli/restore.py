"""``blockbackup restore --repo R latest|SNAPSHOT[:DISK] OUT [--format raw|qcow2]``.

The restore is the backup job from a ``bb-repo-snapshot`` node into a new image: the same
copy engine, and every chunk is checked (a damaged one fails the restore, naming it).
An existing OUT is never overwritten. The image is written to a partial file next to OUT
(``.OUT.partial-TAG``, as a backup's) and renamed to OUT only once it is complete and on
disk, so no file under that name is ever a restore that is not one, even after a SIGKILL
or a crash; a failed, cancelled or stopped restore (Ctrl-C, SIGTERM, SIGHUP) removes its
partial file, and the next restore to OUT removes those of runs that died.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import sys
from pathlib import Path
from typing import Any

from blockbackup.cli.heap import keep_freed_memory
from blockbackup.cli.repo_common import (
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    copy_with_progress,
    emit,
    guarded,
    open_secret,
    requests_of,
    run_stoppable,
    secret_object,
    stop_signals,
    storage_options,
)
from blockbackup.errors import BlockBackupError


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("restore", help="restore a snapshot's disk into a new image")
    add_repo_arg(parser)
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="latest, an id or prefix, [:DISK]")
    parser.add_argument("out", metavar="OUT", help="the image to create")
    parser.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.cli import stale  # lazy: start-up cost
    from blockbackup.cli.runs import RunTag  # lazy: start-up cost

    keep_freed_memory()
    final = Path(os.path.abspath(args.out))
    if os.path.lexists(final):
        raise BlockBackupError(f"{args.out} exists: restore writes a new image only")
    if not final.parent.is_dir():
        raise BlockBackupError(f"no such directory: {final.parent}")
    stale.remove_dead_partials(final, lambda text: print(text, file=sys.stderr))
    partial = RunTag.new().partial_path(final)
    with stop_signals() as stops:
        try:
            try:  # first: a directory it cannot write is said before a passphrase is asked
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                os.close(os.open(partial, flags, 0o644))
            except OSError as exc:  # named by OUT: the partial file's name is ours
                raise BlockBackupError(f"cannot create {args.out}: {exc.strerror}") from None
            secret = open_secret(args)
            result = run_stoppable(_restore(args, secret, partial, final), stops)
        except BaseException:
            partial.unlink(missing_ok=True)  # ours alone: created exclusively by this run
            raise
    emit(args, result, f"restored {result['snapshot']}:{result['disk']} to {args.out}")
    return 0


async def _restore(
    args: argparse.Namespace, secret: bytes | None, partial: Path, final: Path
) -> dict[str, Any]:
    from blockbackup.api import BackupFailed, BlockBackup  # lazy: start-up cost
    from blockbackup.block.qcow2.create import create_qcow2_file  # lazy: start-up cost
    from blockbackup.cli import targets  # lazy: start-up cost
    from blockbackup.cli.qmpclient import CliError  # lazy: start-up cost
    from blockbackup.repository.drivers import RepoSnapshotDriver  # lazy: start-up cost

    key = secret_object(secret)
    async with BlockBackup() as bb:
        if key is not None:
            bb.object_add(key)
        spec, _, disk = args.snapshot.partition(":")
        snap_options: dict[str, Any] = {
            "driver": "bb-repo-snapshot",
            "node-name": "snapshot",
            "repository": args.repo,
            "snapshot": spec or "latest",
            "read-only": True,
            **storage_options(args),
        }
        if disk:
            snap_options["disk"] = disk
        if key is not None:
            snap_options["key-secret"] = key["id"]
        snapshot = await bb.blockdev_add(snap_options)
        driver = snapshot.driver
        assert isinstance(driver, RepoSnapshotDriver)
        if args.format == "qcow2":
            await asyncio.to_thread(create_qcow2_file, str(partial), snapshot.size)
        else:
            os.truncate(partial, snapshot.size)
        await bb.blockdev_add(
            {
                "driver": args.format,
                "node-name": "out",
                "file": {"driver": "file", "filename": str(partial)},
            }
        )
        try:
            await copy_with_progress(bb, "snapshot", "out", f"restore {driver.disk}", args.json)
        except BackupFailed as exc:
            if driver.damaged:  # the chunk, not just "Input/output error"
                raise BlockBackupError(
                    f"damaged data, nothing restored: {driver.damaged[0]}"
                ) from exc
            if driver.storage_error:  # S3 after its retries, a damaged local table
                raise BlockBackupError(f"{driver.storage_error}: nothing restored") from exc
            if str(exc) == os.strerror(errno.ENOSPC):  # say where, and what is left
                raise BlockBackupError(
                    f"{exc} writing {args.out}: nothing restored (the partial image is "
                    f"removed; it needs {snapshot.size} bytes, less its holes)"
                ) from exc
            raise
        # The job ended with the image's flush; the node may keep it open across the rename,
        # which refuses a file that took the name meanwhile (another restore to it).
        try:
            await asyncio.to_thread(targets.commit, partial, final)  # data, then the name
        except CliError as exc:
            raise BlockBackupError(str(exc)) from None
        return {
            "disk": driver.disk,
            "size": snapshot.size,
            "out": args.out,
            "snapshot": driver.snapshot_id,
            "requests": requests_of(driver.repo),
        }
