"""``blockbackup restore --repo R latest|SNAPSHOT[:DISK] OUT [--format raw|qcow2]``.

The restore is the backup job from a ``bb-repo-snapshot`` node into a new image: the same
copy engine, and every chunk is checked (a damaged one fails the restore, naming it).
An existing OUT is never overwritten; a failed restore removes the image it created.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
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
    secret_object,
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
    keep_freed_memory()
    if os.path.lexists(args.out):
        raise BlockBackupError(f"{args.out} exists: restore writes a new image only")
    secret = open_secret(args)
    try:
        result = asyncio.run(_restore(args, secret))
    except BaseException:
        # only a file this run created is removed (OUT did not exist when it started)
        if os.path.lexists(args.out):
            os.unlink(args.out)
        raise
    emit(args, result, f"restored {result['snapshot']}:{result['disk']} to {args.out}")
    return 0


async def _restore(args: argparse.Namespace, secret: bytes | None) -> dict[str, Any]:
    from blockbackup.api import BackupFailed, BlockBackup  # lazy: start-up cost
    from blockbackup.block.qcow2.create import create_qcow2_file  # lazy: start-up cost
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
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        if args.format == "qcow2":
            await asyncio.to_thread(create_qcow2_file, args.out, snapshot.size)
        else:
            os.truncate(args.out, snapshot.size)
        await bb.blockdev_add(
            {
                "driver": args.format,
                "node-name": "out",
                "file": {"driver": "file", "filename": args.out},
            }
        )
        try:
            await copy_with_progress(bb, "snapshot", "out", f"restore {driver.disk}", args.json)
        except BackupFailed as exc:
            if driver.damaged:  # the chunk, not just "Input/output error"
                raise BlockBackupError(
                    f"damaged data, nothing restored: {driver.damaged[0]}"
                ) from exc
            if str(exc) == os.strerror(errno.ENOSPC):  # say where, and what is left
                raise BlockBackupError(
                    f"{exc} writing {args.out}: nothing restored (the partial image is "
                    f"removed; it needs {snapshot.size} bytes, less its holes)"
                ) from exc
            raise
        return {
            "disk": driver.disk,
            "size": snapshot.size,
            "out": args.out,
            "snapshot": driver.snapshot_id,
            "requests": requests_of(driver.repo),
        }
