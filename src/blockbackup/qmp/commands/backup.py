"""``blockdev-backup``: QMP arguments mapped onto :class:`BackupOptions`.

Why the member list is QEMU 7.2's (order included): the order decides which error a
request with several mistakes gets. Two newer members are added after 7.2's, deliberately:
``discard-source`` (QEMU 9.1, push backup with fleecing) and ``on-cbw-error`` (QEMU 10.1),
with the newer QEMUs' meaning; 7.2 refuses them as unexpected.
"""

from __future__ import annotations

from typing import Any

from blockbackup.jobs.backup import BackupOptions, BackupPerf, start_backup
from blockbackup.qmp.context import Context
from blockbackup.qmp.registry import Args, command
from blockbackup.qmp.schema import BOOL, INT, STR, Enum, Member, Struct


class LeafEnum(Enum):
    """An enum whose error names the member only (``'sync'``, also inside a
    ``transaction``), as QEMU's input visitor does."""

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        return super().check(value, path.rsplit(".", 1)[-1], keyval=keyval)


SYNC_MODE = LeafEnum("MirrorSyncMode", ("top", "full", "none", "incremental", "bitmap"))
BITMAP_SYNC_MODE = LeafEnum("BitmapSyncMode", ("on-success", "never", "always"))
ON_ERROR = LeafEnum("BlockdevOnError", ("report", "ignore", "enospc", "stop", "auto"))
ON_CBW_ERROR = LeafEnum("OnCbwError", ("break-guest-write", "break-snapshot"))
BACKUP_PERF = Struct(
    "BackupPerf",
    [
        Member("use-copy-range", BOOL, optional=True),
        Member("max-workers", INT, optional=True),
        Member("max-chunk", INT, optional=True),
    ],
)
BLOCKDEV_BACKUP = Struct(
    "BlockdevBackup",
    [
        Member("job-id", STR, optional=True),
        Member("device", STR),
        Member("sync", SYNC_MODE),
        Member("speed", INT, default=0),
        Member("bitmap", STR, optional=True),
        Member("bitmap-mode", BITMAP_SYNC_MODE, optional=True),
        Member("compress", BOOL, default=False),
        Member("on-source-error", ON_ERROR, default="report"),
        Member("on-target-error", ON_ERROR, default="report"),
        Member("auto-finalize", BOOL, default=True),
        Member("auto-dismiss", BOOL, default=True),
        Member("filter-node-name", STR, optional=True),
        Member("x-perf", BACKUP_PERF, optional=True, features=("unstable",)),
        Member("target", STR),
        Member("discard-source", BOOL, default=False),
        Member("on-cbw-error", ON_CBW_ERROR, default="break-guest-write"),
    ],
)


def backup_options(args: Args) -> BackupOptions:
    """The core's options for validated ``blockdev-backup`` arguments."""
    perf_args = args.get("x-perf", {})
    perf = BackupPerf(
        use_copy_range=perf_args.get("use-copy-range", False),
        max_workers=perf_args.get("max-workers", 64),
        max_chunk=perf_args.get("max-chunk", 0),
    )
    return BackupOptions(
        device=args["device"],
        target=args["target"],
        sync=args["sync"],
        job_id=args.get("job-id"),
        speed=args["speed"],
        bitmap=args.get("bitmap"),
        bitmap_mode=args.get("bitmap-mode"),
        compress=args["compress"],
        on_source_error=args["on-source-error"],
        on_target_error=args["on-target-error"],
        auto_finalize=args["auto-finalize"],
        auto_dismiss=args["auto-dismiss"],
        filter_node_name=args.get("filter-node-name"),
        discard_source=args["discard-source"],
        on_cbw_error=args["on-cbw-error"],
        x_perf=perf,
    )


@command("blockdev-backup", args=BLOCKDEV_BACKUP)
async def blockdev_backup(ctx: Context, args: Args) -> None:
    services = ctx.services
    await start_backup(services.graph, services.jobs, backup_options(args))
