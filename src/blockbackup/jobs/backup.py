"""The backup job: policy only.

The mechanics live elsewhere: the copy-before-write filter intercepts writes to the source,
and the block-copy engine it owns copies clusters. The job:

1. validates the arguments (QEMU's texts, QEMU's order);
2. defines the point in time: quiesces the source, and inside that section inserts the
   filter (which seeds the copy bitmap), so every write is wholly before T0 or after it;
3. runs background passes until nothing is left, applying ``on-source-error`` /
   ``on-target-error`` and honouring pause and the rate limit;
4. flushes the target before it reports success (from the COMPLETED event on, the backup
   survives a crash), and drops the filter when it ends, whatever the outcome.

``sync=none`` copies nothing in the background: only copy-before-write, until cancelled
(classic image fleecing).

With a dirty bitmap (``sync=incremental|bitmap``, or ``full|top`` with the bitmap as output
only) the bitmap is frozen at T0 (its successor records the job's writes) and, for
incremental/bitmap, seeds the copy bitmap; the ``bitmap-mode`` is applied when the job has
ended and no copy is in flight. Starting is split into :func:`plan_backup` (checks),
:func:`insert_backup` (T0, under the caller's quiesce) and ``JobManager.start``, so a
``transaction`` can hold several sources quiesced and give them one T0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from blockbackup.block.block_copy import BackgroundSettings, BlockCopy, CopyError
from blockbackup.block.dirty_bitmap import DirtyBitmap, find_bitmap
from blockbackup.block.filters.copy_before_write import (
    ON_CBW_ERROR_DEFAULT,
    CopyBeforeWriteDriver,
    OnCbwError,
)
from blockbackup.block.graph import Graph
from blockbackup.block.node import BlockNode
from blockbackup.errors import BlockBackupError, enum_value
from blockbackup.jobs.job import Job, JobManager, JobTxn
from blockbackup.jobs.status import BlockdevOnError, ErrorAction, JobStatus

INT_MAX = 2147483647


class SyncMode(StrEnum):
    """``sync``: what the background copy copies (QEMU's ``MirrorSyncMode``, its order)."""

    TOP = "top"
    FULL = "full"
    NONE = "none"
    INCREMENTAL = "incremental"
    BITMAP = "bitmap"


class BitmapSyncMode(StrEnum):
    """``bitmap-mode``: what becomes of the user's bitmap when the job ends."""

    ON_SUCCESS = "on-success"
    NEVER = "never"
    ALWAYS = "always"


#: The one default of ``on-source-error`` and ``on-target-error``.
ON_ERROR_DEFAULT = BlockdevOnError.REPORT


@dataclass(slots=True)
class BackupPerf:
    """QEMU's ``x-perf`` (unstable): background-copy tuning."""

    use_copy_range: bool = False
    max_workers: int = 64
    max_chunk: int = 0
    min_cluster_size: int = 0
    #: blockbackup extension: an exact cluster size (power of 2, >= 512) instead of QEMU's rule.
    cluster_size: int = 0


@dataclass(slots=True)
class BackupOptions:
    """The arguments of ``blockdev-backup`` (QMP names with ``-`` as ``_``)."""

    device: str
    target: str
    sync: SyncMode
    job_id: str | None = None
    speed: int = 0
    bitmap: str | None = None
    bitmap_mode: BitmapSyncMode | None = None
    compress: bool = False
    on_source_error: BlockdevOnError = ON_ERROR_DEFAULT
    on_target_error: BlockdevOnError = ON_ERROR_DEFAULT
    auto_finalize: bool = True
    auto_dismiss: bool = True
    filter_node_name: str | None = None
    discard_source: bool = False
    on_cbw_error: OnCbwError = ON_CBW_ERROR_DEFAULT
    x_perf: BackupPerf = field(default_factory=BackupPerf)

    def __post_init__(self) -> None:
        """Check the enum options once, where they enter (in QEMU's order): a library
        caller may pass plain strings; everything below sees members only."""
        self.sync = enum_value(SyncMode, "sync", self.sync)
        self.on_source_error = enum_value(BlockdevOnError, "on-source-error", self.on_source_error)
        self.on_target_error = enum_value(BlockdevOnError, "on-target-error", self.on_target_error)
        if self.bitmap_mode is not None:
            self.bitmap_mode = enum_value(BitmapSyncMode, "bitmap-mode", self.bitmap_mode)
        self.on_cbw_error = enum_value(OnCbwError, "on-cbw-error", self.on_cbw_error)


def _busy_job(node: BlockNode) -> str | None:
    for user, description in node.users.items():
        if isinstance(user, BackupJob) and user.target is node:
            return description
    return None


def _check_bitmap_arguments(
    opts: BackupOptions, source: BlockNode
) -> tuple[DirtyBitmap | None, BitmapSyncMode | None]:
    """QEMU's bitmap argument rules, in QEMU's order: (the bitmap, the effective mode)."""
    sync, mode = opts.sync, opts.bitmap_mode
    if sync in (SyncMode.INCREMENTAL, SyncMode.BITMAP) and opts.bitmap is None:
        raise BlockBackupError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync is SyncMode.INCREMENTAL:
        if mode is not None and mode is not BitmapSyncMode.ON_SUCCESS:
            raise BlockBackupError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        sync, mode = SyncMode.BITMAP, BitmapSyncMode.ON_SUCCESS
    if opts.bitmap is None:
        if mode is not None:
            raise BlockBackupError("Cannot specify bitmap sync mode without a bitmap")
        return None, None
    bitmap = find_bitmap(source, opts.bitmap)
    if bitmap is None:
        raise BlockBackupError(f"Bitmap '{opts.bitmap}' could not be found")
    if mode is None:
        raise BlockBackupError("Bitmap sync mode must be given when providing a bitmap")
    bitmap.check_usable()
    if sync is SyncMode.NONE:
        raise BlockBackupError("sync mode 'none' does not produce meaningful bitmap outputs")
    if mode is BitmapSyncMode.NEVER and sync is not SyncMode.BITMAP:
        raise BlockBackupError(
            f"Bitmap sync mode 'never' has no meaningful effect when combined with "
            f"sync mode '{sync}'"
        )
    return bitmap, mode


@dataclass(slots=True)
class BackupPlan:
    """Validated ``blockdev-backup`` arguments, ready to be inserted at a point in time."""

    opts: BackupOptions
    source: BlockNode
    target: BlockNode
    bitmap: DirtyBitmap | None
    bitmap_mode: BitmapSyncMode | None
    filter_options: dict[str, Any]


def plan_backup(graph: Graph, jobs: JobManager, opts: BackupOptions) -> BackupPlan:
    """Check every argument (QEMU's texts and order); change nothing.

    The enum options were checked when ``opts`` was made (:class:`BackupOptions`)."""
    source = graph.get(opts.device)
    target = graph.get(opts.target)
    bitmap, bitmap_mode = _check_bitmap_arguments(opts, source)
    if source is target:
        raise BlockBackupError("Source and target cannot be the same")
    if opts.compress and not target.driver.can_compress():
        raise BlockBackupError("Compression is not supported for this drive ")
    for node in (source, target):
        busy = _busy_job(node)
        if busy is not None:
            raise BlockBackupError(f"Node '{node.name}' is busy: block device is in use by {busy}")
    perf = opts.x_perf
    if not 1 <= perf.max_workers <= INT_MAX:
        raise BlockBackupError(f"max-workers must be between 1 and {INT_MAX}")
    if perf.max_chunk < 0:
        raise BlockBackupError("max-chunk must be zero (which means no limit) or positive")
    if source.size != target.size:
        raise BlockBackupError("Source and target image have different sizes")
    if opts.job_id is None:
        raise BlockBackupError("Invalid job ID ''")
    jobs.validate_job_id(opts.job_id)

    filter_options: dict[str, Any] = {
        "driver": "copy-before-write",
        "file": source.name,
        "target": target.name,
        "on-cbw-error": opts.on_cbw_error.value,
    }
    if perf.min_cluster_size:
        filter_options["min-cluster-size"] = perf.min_cluster_size
    if perf.cluster_size:
        filter_options["x-cluster-size"] = perf.cluster_size
    if opts.filter_node_name is not None:
        filter_options["node-name"] = opts.filter_node_name
    return BackupPlan(opts, source, target, bitmap, bitmap_mode, filter_options)


async def insert_backup(
    graph: Graph, jobs: JobManager, plan: BackupPlan, txn: JobTxn | None = None
) -> BackupJob:
    """Insert the filter and create the job (``created``), freezing the bitmap: T0.

    The caller holds ``plan.source`` quiesced, so every write is wholly before this moment
    or after it. On failure everything is undone before the exception propagates. The job
    is started by ``jobs.start`` (the commit step); cancelling it instead undoes it.
    """
    opts = plan.opts
    filter_node = await graph.add(plan.filter_options, implicit=opts.filter_node_name is None)
    job: BackupJob | None = None
    try:
        job = BackupJob(opts, jobs, graph, plan.source, plan.target, filter_node)
        # As QEMU's bdrv_cbw_append: the source's users move onto the filter before the
        # job exists (the filter protects the source from the moment it has users).
        job.move_users_to_filter()
        jobs.register(job, txn)
        job.use_filter()
        job.attach_bitmap(plan.bitmap, plan.bitmap_mode)
    except BaseException:
        await _undo_insert(graph, jobs, plan, filter_node, job)
        raise
    return job


async def _undo_insert(
    graph: Graph,
    jobs: JobManager,
    plan: BackupPlan,
    filter_node: BlockNode,
    job: BackupJob | None,
) -> None:
    """Take back an inserted backup that never started (no events beyond ``null``)."""
    if job is not None:
        if job.status is JobStatus.CREATED:
            jobs.discard(job)
        plan.target.remove_user(job)
        filter_node.remove_user(job)
        job.release_bitmap(success=False)
    filter_node.move_users(plan.source)
    await graph.drop(filter_node)


async def start_backup(
    graph: Graph,
    jobs: JobManager,
    opts: BackupOptions,
    txn: JobTxn | None = None,
    *,
    at_point_in_time: Callable[[], Awaitable[None]] | None = None,
) -> BackupJob:
    """Validate ``blockdev-backup`` arguments, set the point in time and start the job.

    ``at_point_in_time`` is awaited while the source is quiesced at T0, after the
    interception is in place: the moment the backup shows (e.g. to freeze an application,
    or to take an independent reference copy in tests).
    """
    plan = plan_backup(graph, jobs, opts)
    async with plan.source.quiesced():  # T0: no write is in flight, none can start
        job = await insert_backup(graph, jobs, plan, txn)
        if at_point_in_time is not None:
            try:
                await at_point_in_time()
            except BaseException:
                await _undo_insert(graph, jobs, plan, job.filter_node, job)
                raise
    jobs.start(job)
    return job


class BackupJob(Job):
    """A live backup of ``source`` to ``target`` as of the moment it started."""

    job_type = "backup"

    def __init__(
        self,
        opts: BackupOptions,
        manager: JobManager,
        graph: Graph,
        source: BlockNode,
        target: BlockNode,
        filter_node: BlockNode,
    ) -> None:
        assert opts.job_id is not None
        super().__init__(
            opts.job_id,
            manager,
            auto_finalize=opts.auto_finalize,
            auto_dismiss=opts.auto_dismiss,
            speed=opts.speed,
        )
        self.options = opts
        self.graph = graph
        self.source = source
        self.target = target
        self.filter_node = filter_node
        driver = filter_node.driver
        assert isinstance(driver, CopyBeforeWriteDriver)
        self.filter = driver
        self.block_copy: BlockCopy = driver.block_copy
        perf = opts.x_perf
        cluster = self.block_copy.cluster_size
        if perf.max_chunk and perf.max_chunk < cluster:
            raise BlockBackupError(
                f"Required max-chunk ({perf.max_chunk}) is less than "
                f"backup cluster size ({cluster})"
            )
        bcs = self.block_copy
        bcs.use_copy_range = perf.use_copy_range
        bcs.compress = opts.compress
        bcs.discard_source = opts.discard_source
        bcs.skip_unallocated = opts.sync is SyncMode.TOP  # incremental/bitmap: seeded at T0
        bcs.on_progress = self._update_progress
        if opts.sync is SyncMode.NONE:
            bcs.copy_bitmap.fill()  # every first write is copied; nothing else
        self.settings = BackgroundSettings(max_workers=perf.max_workers, max_chunk=perf.max_chunk)
        self.on_source_error = opts.on_source_error
        self.on_target_error = opts.on_target_error
        #: The user's bitmap (frozen while the job runs) and what to do with it at the end.
        self.sync_bitmap: DirtyBitmap | None = None
        self.bitmap_mode: BitmapSyncMode | None = None
        self._succeeded = False
        # The filter, as the source's parent, keeps the source in use; the target is ours.
        target.add_user(self, "block job: backup")
        self._update_progress()

    def use_filter(self) -> None:
        """Become a user of the filter, which then protects the source: nobody else may
        write or resize it while the job runs (QEMU's copy-before-write permissions).

        Done once the job exists (``created``), as in QEMU: another process writing the
        source fails the job's creation with QEMU's lock error, and the job goes ``null``.
        """
        self.filter_node.add_user(self, "block job: backup")

    def attach_bitmap(self, bitmap: DirtyBitmap | None, mode: BitmapSyncMode | None) -> None:
        """Freeze ``bitmap`` at T0 (the source quiesced); for sync=bitmap it is the input.

        Writes from now on are recorded by the bitmap's successor, whatever the outcome.
        """
        if bitmap is None:
            return
        assert mode is not None
        bitmap.create_successor()
        self.sync_bitmap = bitmap
        self.bitmap_mode = mode
        if self.options.sync in (SyncMode.BITMAP, SyncMode.INCREMENTAL):
            copy_bitmap = self.block_copy.copy_bitmap
            copy_bitmap.clear()
            copy_bitmap.merge(bitmap.bitmap)  # rounded outward to the backup cluster size
        self._update_progress()

    def release_bitmap(self, *, success: bool) -> None:
        """Apply the bitmap mode (QEMU's ``backup_cleanup_sync_bitmap``); at most once.

        ``on-success``: on success the bitmap keeps only the writes made during the job,
        otherwise the frozen bits come back. ``always``: like success even on failure, plus
        every cluster left uncopied. ``never``: the bitmap gains the job's writes only.
        Called when no copy is in flight any more, so the uncopied set is exact.
        """
        bitmap, mode = self.sync_bitmap, self.bitmap_mode
        if bitmap is None or bitmap.successor is None:
            return
        self.sync_bitmap = None
        if (success or mode is BitmapSyncMode.ALWAYS) and mode is not BitmapSyncMode.NEVER:
            result = bitmap.abdicate()
        else:
            result = bitmap.reclaim()
        if not success and mode is BitmapSyncMode.ALWAYS:
            result.bitmap.merge(self.block_copy.copy_bitmap)
            for req in self.block_copy.reqs:  # none expected: the copies have settled
                result.bitmap.set(req.offset, req.length)

    def _update_progress(self) -> None:
        bcs = self.block_copy
        self.progress_current = bcs.bytes_done
        if self.options.sync is SyncMode.NONE:
            self.progress_total = self.source.size
        else:
            self.progress_total = bcs.bytes_done + bcs.bytes_remaining

    def on_speed_changed(self) -> None:
        self.block_copy.kick()

    def _check_snapshot(self) -> None:
        if self.filter.snapshot_error is not None:
            raise self.filter.snapshot_error

    async def run(self) -> None:
        if self.options.sync is SyncMode.NONE:
            await self._serve_until_cancelled()
            return
        while True:
            await self.pause_point()
            self._check_snapshot()
            try:
                if await self._copy_until_paused():
                    break
            except CopyError as err:
                policy = self.on_source_error if err.is_read else self.on_target_error
                action = await self.handle_error(policy, err.err, is_read=err.is_read)
                if action is ErrorAction.REPORT:
                    raise err.err from err
        self._check_snapshot()
        await self.target.flush()
        if self.target.early_writeback():
            # Drop-behind evicts as the copy goes, which leaves the last copies (those
            # since its last drop) cached; nobody reads a backup back soon. After the
            # flush they are clean, so this evicts them all at once.
            await self.target.drop_cache()
        self._update_progress()

    async def _serve_until_cancelled(self) -> None:
        """sync=none: copy-before-write only, until the job is cancelled or the snapshot breaks."""
        while True:
            await self.pause_point()
            self._check_snapshot()
            await self._first(self.wait_pause_requested(), self.filter.broken.wait())

    async def _copy_until_paused(self) -> bool:
        """Run a background pass; True when it finished, False when a pause (or a broken
        snapshot) interrupted it."""
        copy = asyncio.ensure_future(self.block_copy.run_background(self.settings, self.rate_limit))
        try:
            await self._first(copy, self.wait_pause_requested(), self.filter.broken.wait())
        finally:
            copy.cancel()
            await asyncio.wait({copy})
            self._update_progress()
        if copy.cancelled():
            return False
        copy.result()  # raises the pass's CopyError
        return True

    @staticmethod
    async def _first(*aws: Awaitable[object]) -> None:
        """Wait until the first of ``aws`` is done; cancel the rest (not futures passed in)."""
        tasks = [asyncio.ensure_future(aw) for aw in aws]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task, aw in zip(tasks, aws, strict=True):
                if task is not aw:
                    task.cancel()

    def move_users_to_filter(self) -> None:
        """Exports of the source now serve the filter node, as QEMU moves parents above it."""
        self.source.move_users(self.filter_node)

    async def commit(self) -> None:
        self._succeeded = True

    async def clean(self) -> None:
        try:
            self.target.remove_user(self)
            # The job lets go of the filter first: a filter nobody uses no longer keeps
            # others from writing the source, so the exports can move back onto it.
            self.filter_node.remove_user(self)
            self.filter_node.move_users(self.source)
            await self.graph.drop(self.filter_node)  # waits for every copy in flight
        finally:
            self.release_bitmap(success=self._succeeded)
