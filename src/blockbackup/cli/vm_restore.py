"""``blockbackup vm restore --repo R SNAPSHOT --disk DISK OUT [--format raw|qcow2]``.

``DISK`` is the disk's name in the repository (``VM/DISK``, as ``vm backup`` prints it) or
the QEMU disk's own name when one disk of the snapshot has it. The restore itself is
``blockbackup restore``'s: the backup job from a snapshot node into a new image.
"""

from __future__ import annotations

import argparse
import sys

from blockbackup.cli import restore
from blockbackup.cli.repo_common import open_repository
from blockbackup.errors import BlockBackupError


def run(args: argparse.Namespace) -> int:
    from blockbackup.repository import catalog  # lazy: start-up cost

    args.command = "vm restore"
    try:
        repo = open_repository(args)
        if ":" in args.snapshot:
            raise BlockBackupError("give the disk with --disk, not SNAPSHOT:DISK")
        manifest = repo.manifest(catalog.resolve(repo.backend, args.snapshot))
        names = [d.name for d in manifest.disks]
        found = [n for n in names if n == args.disk] or [
            n for n in names if n.rpartition("/")[2] == args.disk
        ]
        if len(found) != 1:
            what = "no disk" if not found else "several disks"
            raise BlockBackupError(
                f"snapshot {manifest.id} has {what} {args.disk!r} (its disks: {', '.join(names)})"
            )
    except BlockBackupError as exc:
        print(f"blockbackup vm restore: {exc}", file=sys.stderr)
        return 1
    args.snapshot = f"{manifest.id}:{found[0]}"
    return restore.run(args)
