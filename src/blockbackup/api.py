"""The library API: blockbackup without a daemon.

:class:`BlockBackup` owns a block graph, a job manager and an event bus: the same objects
the daemon serves over QMP, driven from Python::

    async with BlockBackup() as bb:
        await bb.blockdev_add({"driver": "raw", "node-name": "src",
                               "file": {"driver": "file", "filename": "disk.img"}})
        await bb.blockdev_add({"driver": "raw", "node-name": "tgt",
                               "file": {"driver": "file", "filename": "backup.img"}})
        job = await bb.backup("src", "tgt", sync="full")
        await bb.wait(job)          # raises BackupFailed if the job failed

A job whose error policy is ``stop`` (or ``enospc`` on a full disk) pauses on the error
instead of failing: :meth:`BlockBackup.wait` then raises :class:`JobPausedOnError`, and the
caller fixes the cause and calls ``job.resume()`` (then waits again), or cancels the job.

:func:`backup` is the one-shot form for nodes you already hold.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, cast

from blockbackup.block.graph import CloseError, Graph
from blockbackup.block.node import BlockNode
from blockbackup.errors import BlockBackupError
from blockbackup.events import EventBus
from blockbackup.jobs.backup import BackupJob, BackupOptions, BackupPerf, SyncMode, start_backup
from blockbackup.jobs.job import Job, JobManager

_job_ids = itertools.count()


class BackupFailed(BlockBackupError):
    """A job ended with an error or was cancelled; the message is the job's error text."""


class JobPausedOnError(BlockBackupError):
    """A job is paused by its error policy and waits for ``job.resume()`` or a cancel.

    Why an exception and not a silent wait: nothing else would ever end the wait, and the
    caller is the one who can free space or fix the device. The job is still alive (its
    point in time and progress are kept); ``BLOCK_JOB_ERROR`` was sent on the event bus.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        #: QEMU's ``io-status``: "nospace" or "failed".
        self.io_status = job.io_status.value
        #: "read" (source) or "write" (target).
        self.operation = job.stopped_operation
        #: The I/O error the job stopped on.
        self.error = job.stopped_error
        reason = self.error.strerror if self.error is not None else self.io_status
        super().__init__(f"job {job.id} paused on a {self.operation} error: {reason}")


class BlockBackup:
    """A graph, its jobs and their events, with an async context that closes them all."""

    def __init__(self, graph: Graph | None = None, events: EventBus | None = None) -> None:
        self.graph = graph if graph is not None else Graph()
        self.events = events if events is not None else EventBus()
        self.jobs = JobManager(self.events)

    async def __aenter__(self) -> BlockBackup:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        except CloseError:
            if exc is None:
                raise
            # Logged with its nodes by the graph; the caller sees the error in flight.

    async def aclose(self) -> None:
        """Cancel running jobs, then flush and close every node.

        :raise CloseError: a node's final flush failed (every node is closed anyway).
        """
        await self.jobs.aclose()
        await self.graph.aclose()

    async def blockdev_add(self, options: Mapping[str, Any]) -> BlockNode:
        """Create a node from ``blockdev-add`` options."""
        return await self.graph.add(options)

    def object_add(self, options: Mapping[str, Any]) -> object:
        """Create an object of this graph from ``object-add`` options (``qom-type``, ``id``
        and the type's properties): a ``secret``, ``tls-creds-x509`` or ``throttle-group``."""
        props = {k: v for k, v in options.items() if k not in ("qom-type", "id")}
        return self.graph.objects.add(options["qom-type"], options["id"], props)

    def object_del(self, id: str) -> None:
        """``object-del``: refused while a node uses the object."""
        self.graph.objects.delete(id)

    async def backup(
        self,
        device: str,
        target: str,
        *,
        sync: SyncMode | str = SyncMode.FULL,
        job_id: str | None = None,
        perf: BackupPerf | None = None,
        at_point_in_time: Callable[[], Awaitable[None]] | None = None,
        **options: Any,
    ) -> BackupJob:
        """Start a backup job (``blockdev-backup``); keyword names use ``_`` for ``-``."""
        opts = BackupOptions(
            device=device,
            target=target,
            sync=cast("SyncMode", sync),  # a plain string is checked by BackupOptions
            job_id=job_id if job_id is not None else f"backup{next(_job_ids)}",
            x_perf=perf if perf is not None else BackupPerf(),
            **options,
        )
        return await start_backup(self.graph, self.jobs, opts, at_point_in_time=at_point_in_time)

    async def wait(self, job: Job) -> None:
        """Wait until ``job`` concluded; raise :class:`BackupFailed` unless it succeeded.

        Raises :class:`JobPausedOnError` as soon as the job is paused by its error policy
        (``on_source_error``/``on_target_error`` ``stop`` or ``enospc``).
        """
        await self.jobs.wait_settled(job)
        if job.paused_on_error:
            raise JobPausedOnError(job)
        if job.error is not None:
            raise BackupFailed(job.error)


async def backup(
    source: BlockNode, target: BlockNode, *, sync: SyncMode | str = SyncMode.FULL, **options: Any
) -> None:
    """Back up ``source`` to ``target`` (nodes of one graph) and wait for the result."""
    if source.graph is not target.graph:
        raise BlockBackupError("source and target must belong to the same graph")
    bb = BlockBackup(source.graph)
    try:
        job = await bb.backup(source.name, target.name, sync=sync, **options)
        await bb.wait(job)
    finally:
        await bb.jobs.aclose()
