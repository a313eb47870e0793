"""``blockbackup vm backup|checkpoints|restore``: pull backups of a running QEMU's disks.

- ``vm backup --qmp SOCK --repo R [--disk D ...] [--full]``: one snapshot of the chosen
  disks (default: every writable disk) at one point in time, incremental where a
  checkpoint allows (``blockbackup.vm.checkpoints``), full otherwise.
- ``vm checkpoints --qmp SOCK [--repo R]``: each disk's checkpoints, what the next backup
  will be, and anything an interrupted run left in QEMU.
- ``vm restore --repo R SNAPSHOT --disk D OUT``: one disk of a snapshot into a new image.

The modules: :mod:`.vm_backup`, :mod:`.vm_checkpoints`, :mod:`.vm_restore`; the QEMU side is
in ``blockbackup/vm/``.
"""

from __future__ import annotations

from typing import Any

from blockbackup.cli import vm_backup, vm_checkpoints, vm_restore
from blockbackup.cli.qmpclient import DEFAULT_TIMEOUT
from blockbackup.cli.repo_common import (
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    add_storage_args,
)

#: Where the temporary fleece images and the NBD socket go (disk-backed, unlike /tmp on
#: many systems: a guest that rewrites its disk during a backup fills it with old data).
DEFAULT_SCRATCH = "/var/tmp"


def _add_qmp(parser: Any) -> None:
    parser.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP socket")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for a monitor another client holds (default {DEFAULT_TIMEOUT:g})",
    )


def add_parser(sub: Any) -> None:
    vm = sub.add_parser("vm", help="pull backups of a running QEMU's disks into a repository")
    cmds = vm.add_subparsers(dest="vm_command", required=True)

    backup = cmds.add_parser("backup", help="back up the VM's disks at one point in time")
    _add_qmp(backup)
    add_repo_arg(backup)
    backup.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="DISK",
        help="a disk (node name, drive id or device id; repeat; default: every writable disk)",
    )
    backup.add_argument("--full", action="store_true", help="a full backup, not incremental")
    backup.add_argument(
        "--vm",
        metavar="NAME",
        help="prefix of the disks' names in the repository (default: QEMU's -name, if any)",
    )
    backup.add_argument(
        "--scratch-dir",
        default=DEFAULT_SCRATCH,
        metavar="DIR",
        help="where QEMU keeps the old data of blocks the guest rewrites during the backup "
        f"(default {DEFAULT_SCRATCH})",
    )
    backup.add_argument(
        "--thin-scratch",
        action="store_true",
        help="do not reserve the disks' size in --scratch-dir up front (QEMU before 10.1: "
        "if the scratch file system fills up during the backup, guest writes fail)",
    )
    add_secret_args(backup)
    add_json_arg(backup)
    backup.set_defaults(run=vm_backup.run)

    checkpoints = cmds.add_parser(
        "checkpoints", help="the disks' checkpoints, the next backup, leftovers"
    )
    _add_qmp(checkpoints)
    checkpoints.add_argument("--repo", metavar="PATH", help="also say what the next backup is")
    add_storage_args(checkpoints)
    checkpoints.add_argument("--vm", metavar="NAME", help="as for vm backup")
    add_secret_args(checkpoints)
    add_json_arg(checkpoints)
    checkpoints.set_defaults(run=vm_checkpoints.run)

    restore = cmds.add_parser("restore", help="restore one disk of a VM snapshot")
    add_repo_arg(restore)
    restore.add_argument("snapshot", metavar="SNAPSHOT", help="latest, an id or a prefix")
    restore.add_argument("--disk", required=True, metavar="DISK", help="the disk to restore")
    restore.add_argument("out", metavar="OUT", help="the image to create")
    restore.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    add_secret_args(restore)
    add_json_arg(restore)
    restore.set_defaults(run=vm_restore.run)
