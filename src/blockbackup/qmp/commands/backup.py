"""``blockdev-backup``: QMP arguments mapped onto :class:`BackupOptions`.

Why the member list is QEMU 7.2's (order included): the order decides which error a
request with several mistakes gets. Two newer members are added after 7.2's, deliberately:
``discard-source`` (QEMU 9.1, push backup with fleecing) and ``on-cbw-error`` (QEMU 10.1),
with the newer QEMUs' meaning; 7.2 refuses them as unexpected.
"""

from __future__ import annotations

from typing import Any

from blockbackup.block.filters.copy_before_write import ON_CBW_ERROR_DEFAULT, OnCbwError
from blockbackup.jobs.backup import (
    ON_ERROR_DEFAULT,
    BackupOptions,
    BackupPerf,
    BitmapSyncMode,
    SyncMode,
    start_backup,
)
from blockbackup.jobs.status import BlockdevOnError
from blockbackup.qmp.context import Context
from blockbackup.qmp.registry import Args, command
from blockbackup.qmp.schema import BOOL, INT, STR, Enum, Member, Struct


class LeafEnum(Enum):
    """An enum whose error names the member only (``'sync'``, also inside a
    ``transaction``), as QEMU's input visitor does."""

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        return super().check(value, path.rsplit(".", 1)[-1], keyval=keyval)


# The QMP types of the option enums: their values (and order) are the Python enums'.
SYNC_MODE = LeafEnum("MirrorSyncMode", tuple(m.value for m in SyncMode))
BITMAP_SYNC_MODE = LeafEnum("BitmapSyncMode", tuple(m.value for m in BitmapSyncMode))
ON_ERROR = LeafEnum("BlockdevOnError", tuple(m.value for m in BlockdevOnError))
ON_CBW_ERROR = LeafEnum("OnCbwError", tuple(m.value for m in OnCbwError))
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
        Member("on-source-error", ON_ERROR, default=ON_ERROR_DEFAULT.value),
        Member("on-target-error", ON_ERROR, default=ON_ERROR_DEFAULT.value),
        Member("auto-finalize", BOOL, default=True),
        Member("auto-dismiss", BOOL, default=True),
        Member("filter-node-name", STR, optional=True),
        Member("x-perf", BACKUP_PERF, optional=True, features=("unstable",)),
        Member("target", STR),
        Member("discard-source", BOOL, default=False),
        Member("on-cbw-error", ON_CBW_ERROR, default=ON_CBW_ERROR_DEFAULT.value),
    ],
)


def backup_options(args: Args) -> BackupOptions:
    """The core's options for validated ``blockdev-backup`` arguments (the enum values
    were checked by the schema; the conversion to members cannot fail)."""
    perf_args = args.get("x-perf", {})
    perf = BackupPerf(  # members left out keep BackupPerf's defaults (the only ones)
        **{
            name.replace("-", "_"): perf_args[name]
            for name in ("use-copy-range", "max-workers", "max-chunk")
            if name in perf_args
        }
    )
    return BackupOptions(
        device=args["device"],
        target=args["target"],
        sync=SyncMode(args["sync"]),
        job_id=args.get("job-id"),
        speed=args["speed"],
        bitmap=args.get("bitmap"),
        bitmap_mode=None if "bitmap-mode" not in args else BitmapSyncMode(args["bitmap-mode"]),
        compress=args["compress"],
        on_source_error=BlockdevOnError(args["on-source-error"]),
        on_target_error=BlockdevOnError(args["on-target-error"]),
        auto_finalize=args["auto-finalize"],
        auto_dismiss=args["auto-dismiss"],
        filter_node_name=args.get("filter-node-name"),
        discard_source=args["discard-source"],
        on_cbw_error=OnCbwError(args["on-cbw-error"]),
        x_perf=perf,
    )


@command("blockdev-backup", args=BLOCKDEV_BACKUP)
async def blockdev_backup(ctx: Context, args: Args) -> None:
    services = ctx.services
    await start_backup(services.graph, services.jobs, backup_options(args))
