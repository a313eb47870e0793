"""The generic job: QEMU's status machine, user verbs, error policy, events and transactions.

Why here and not in the backup job: every long-running block operation needs the same
life cycle and the same QMP-visible behaviour (``query-jobs``, ``JOB_STATUS_CHANGE``,
``BLOCK_JOB_*``), so the backup job only supplies :meth:`Job.run` and the
prepare/commit/abort/clean hooks, and this module drives them.

Theory of operation
-------------------
A job is registered (``created``), then started (``running``): the manager spawns the
job's *run task*, which calls :meth:`Job.run`. The run task is the only thing that is
ever cancelled: ``cancel`` while created/running/paused cancels it, and its end (return,
exception or cancellation) hands over to the job's :class:`JobTxn`:

* failure or cancellation: ``aborting``; the whole transaction aborts (siblings of a
  grouped transaction are cancelled and awaited), then each job runs ``abort`` and
  ``clean``, sends ``BLOCK_JOB_COMPLETED`` with ``error`` (or ``BLOCK_JOB_CANCELLED``),
  and goes ``concluded`` (and ``null`` with auto-dismiss);
* success: ``waiting`` until every job of the transaction finished running, then all go
  ``pending`` together; when none needs a manual ``finalize`` (or on ``finalize``), each
  runs ``prepare``; if all succeed each runs ``commit`` and ``clean``, sends
  ``BLOCK_JOB_COMPLETED`` and goes ``concluded`` (``null``); a failing ``prepare`` aborts
  the transaction instead.

These completion chains run in tasks owned by the :class:`JobManager` (never in the QMP
caller's task), serialised per transaction by a lock, so a disconnecting client cannot
interrupt a commit half-way and two chains never interleave their hooks. Verbs that wait
for a chain (``finalize``, ``cancel`` in waiting/pending) await it through
:func:`asyncio.shield`, so their events arrive before they return, as in QEMU.

Every status change is checked against :data:`~blockbackup.jobs.status.TRANSITIONS` and
sent as ``JOB_STATUS_CHANGE``; QEMU's paused/running flaps around each QMP command are
deliberately not reproduced.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any, ClassVar, Literal

from blockbackup.block.ratelimit import RateLimit
from blockbackup.errors import BlockBackupError, DeviceNotActiveError
from blockbackup.events import EventBus
from blockbackup.jobs.status import (
    BlockdevOnError,
    ErrorAction,
    IoStatus,
    JobStatus,
    JobVerb,
    check_transition,
    check_verb,
    error_action,
)

__all__ = ["CompletionMode", "Job", "JobManager", "JobTxn"]

_log = logging.getLogger(__name__)

_JOB_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
#: strerror(ECANCELED) as glibc spells it (and as QEMU reports it on every host).
_CANCELED_TEXT = "Operation canceled"

CompletionMode = Literal["individual", "grouped"]


def _error_text(exc: BaseException) -> str:
    """The user-visible error text for an exception that failed a job."""
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror
        if exc.errno:
            return os.strerror(exc.errno)
    if isinstance(exc, BlockBackupError):
        return str(exc)
    return str(exc) or type(exc).__name__


class Job(ABC):
    """One long-running operation with QEMU's job life cycle.

    Subclass contract (QEMU's ``JobDriver``):

    * :meth:`run` (mandatory) does the work. Return to succeed; raise to fail: an
      ``OSError``'s ``strerror`` becomes the job's error text (e.g. "Input/output
      error"), a :class:`BlockBackupError`'s message likewise. Never raise
      ``asyncio.CancelledError`` on your own: cancellation is driven by the manager, which
      cancels the task running :meth:`run`; let that ``CancelledError`` propagate (clean
      up in ``finally`` blocks). Call :meth:`pause_point` between units of work; a copy
      that may take long can race it against :meth:`wait_pause_requested` and call
      :meth:`pause_point` when a pause is requested. Update :attr:`progress_current` and
      :attr:`progress_total` as work is done and discovered. On an I/O error, ask
      :meth:`handle_error` what to do. Background work waits in :meth:`rate_limit_wait`
      and charges :attr:`rate_limit`.
    * :meth:`prepare` runs only when :meth:`run` (and every sibling in a grouped
      transaction) succeeded; raising fails the job (and aborts the transaction).
    * Then exactly one of :meth:`commit` (success) or :meth:`abort` (failure or cancel).
    * Then :meth:`clean`, always, also for a job cancelled before it started.
    * :meth:`on_speed_changed` is called after the user changed :attr:`speed`.

    ``commit``, ``abort`` and ``clean`` should not raise; if they do, the exception is
    logged and the life cycle goes on. The default hooks do nothing.
    """

    #: The QMP ``type`` of this job ("backup").
    job_type: ClassVar[str]

    def __init__(
        self,
        job_id: str,
        manager: JobManager,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
    ) -> None:
        self._id = job_id
        self.manager = manager
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        #: Bytes done so far (QEMU's ``offset`` / ``current-progress``).
        self.progress_current = 0
        #: Bytes to do in total, may grow while running (``len`` / ``total-progress``).
        self.progress_total = 0
        self.rate_limit = RateLimit()
        self.io_status = IoStatus.OK
        #: False while the job sleeps in a pause or on the rate limit.
        self.busy = False
        self._requested_speed = speed
        self._speed = 0
        self._status = JobStatus.UNDEFINED
        self._error: str | None = None
        self._txn: JobTxn | None = None
        # Pausing: a user pause counts once, internal pauses nest.
        self._pause_count = 0
        self._user_paused = False
        self._pause_requested = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._kick = asyncio.Event()
        # Life cycle.
        self._started = False
        self._cancelled = False
        self._finalizing = False
        self._run_task: asyncio.Task[None] | None = None
        self._run_done = asyncio.Event()
        self._concluded = asyncio.Event()
        #: Set while the job needs its owner: concluded, or paused by an error policy.
        self._settled = asyncio.Event()
        #: The I/O error a ``stop`` policy paused the job on, and its operation ("read" or
        #: "write"); None once resumed.
        self.stopped_error: OSError | None = None
        self.stopped_operation: str | None = None

    # -- subclass interface ---------------------------------------------------------------

    @abstractmethod
    async def run(self) -> None:
        """Do the job's work (see the class docstring for the contract)."""

    async def prepare(self) -> None:
        """Last step that may still fail the job; runs only after success."""

    async def commit(self) -> None:
        """Make a successful job's result final."""

    async def abort(self) -> None:
        """Undo what a failed or cancelled job did."""

    async def clean(self) -> None:
        """Release resources; runs after commit or abort, always."""

    def on_speed_changed(self) -> None:
        """React to a new :attr:`speed` (the rate limit is already updated)."""

    # -- state ------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The job ID (also the ``device`` of ``BLOCK_JOB_*`` events)."""
        return self._id

    @property
    def status(self) -> JobStatus:
        """The current status."""
        return self._status

    @property
    def speed(self) -> int:
        """The rate limit in bytes per second (0: unlimited)."""
        return self._speed

    @property
    def len(self) -> int:
        """QEMU's ``len``: :attr:`progress_total`."""
        return self.progress_total

    @property
    def offset(self) -> int:
        """QEMU's ``offset``: :attr:`progress_current`."""
        return self.progress_current

    @property
    def paused(self) -> bool:
        """Whether a pause is in effect (requested by the user or an error, or internal)."""
        return self._pause_count > 0 or self._status is JobStatus.PAUSED

    @property
    def user_paused(self) -> bool:
        """Whether the user (or a ``stop`` error) paused the job and must resume it."""
        return self._user_paused

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled (by the user, its transaction or shutdown)."""
        return self._cancelled

    @property
    def error(self) -> str | None:
        """The error text once the job failed or was cancelled, else None."""
        return self._error

    @property
    def paused_on_error(self) -> bool:
        """Paused by an error policy (``stop``, ``enospc``): it waits for resume or cancel."""
        return self._status is JobStatus.PAUSED and self.io_status is not IoStatus.OK

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.manager.events.emit(name, data)

    def _set_status(self, new: JobStatus) -> None:
        old = self._status
        check_transition(old, new)
        self._status = new
        if old is not new:
            self._emit("JOB_STATUS_CHANGE", {"id": self._id, "status": new.value})
        if new in (JobStatus.CONCLUDED, JobStatus.NULL):
            self._concluded.set()
        self._update_settled()
        if new is JobStatus.NULL:
            self.manager._forget(self)

    def _update_settled(self) -> None:
        if self._concluded.is_set() or self.paused_on_error:
            self._settled.set()
        else:
            self._settled.clear()

    # -- pausing ------------------------------------------------------------------------------

    def _pause(self) -> None:
        self._pause_count += 1
        self._pause_requested.set()
        self._resumed.clear()
        self._kick.set()

    def _resume(self) -> None:
        assert self._pause_count > 0
        self._pause_count -= 1
        if self._pause_count == 0:
            self._pause_requested.clear()
            self._resumed.set()

    def pause(self) -> None:
        """The ``job-pause`` verb: the job pauses at its next pause point."""
        check_verb(self._id, self._status, JobVerb.PAUSE)
        if self._user_paused:
            raise BlockBackupError("Job is already paused")
        self._user_paused = True
        self._pause()

    def resume(self) -> None:
        """The ``job-resume`` verb: undo a user (or ``stop`` error) pause."""
        if not self._user_paused:
            raise BlockBackupError("Can't resume a job that was not paused")
        check_verb(self._id, self._status, JobVerb.RESUME)
        self._user_paused = False
        self.io_status = IoStatus.OK
        self.stopped_error = self.stopped_operation = None
        self._update_settled()
        self._resume()

    async def wait_pause_requested(self) -> None:
        """Return once a pause is requested (at once if one already is)."""
        await self._pause_requested.wait()

    async def pause_point(self) -> None:
        """Pause here if a pause is requested: running -> paused, wait, -> running."""
        if self._pause_count == 0 or self._status is not JobStatus.RUNNING:
            return
        self._set_status(JobStatus.PAUSED)
        self.busy = False
        try:
            await self._resumed.wait()
        finally:
            self.busy = True
            self._set_status(JobStatus.RUNNING)

    async def rate_limit_wait(self, nbytes: int) -> None:
        """Wait until the rate limit admits ``nbytes``; then do the work and ``charge`` it.

        A speed change or a pause request ends the wait early (the limit is re-checked),
        and pauses are honoured while waiting.
        """
        while (delay := self.rate_limit.delay_for(nbytes)) > 0:
            self._kick.clear()
            self.busy = False
            try:
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            except TimeoutError:
                pass
            finally:
                self.busy = True
            await self.pause_point()

    # -- errors -----------------------------------------------------------------------------

    async def handle_error(
        self, policy: BlockdevOnError, err: OSError, *, is_read: bool
    ) -> ErrorAction:
        """Apply the error policy to one I/O error and say what the caller must do.

        Sends ``BLOCK_JOB_ERROR``. ``REPORT``: raise ``err`` (the job fails). ``IGNORE``:
        retry. ``STOP``: the job was paused with ``io-status`` failed/nospace, this call
        returned only after the user resumed it: retry.
        """
        code = err.errno or errno.EIO
        action = error_action(policy, code, is_read)
        if action is ErrorAction.STOP:
            if not self._user_paused:
                self._user_paused = True
                self._pause()
            self.io_status = IoStatus.NOSPACE if code == errno.ENOSPC else IoStatus.FAILED
            self.stopped_error = err
            self.stopped_operation = "read" if is_read else "write"
        self._emit(
            "BLOCK_JOB_ERROR",
            {
                "device": self._id,
                "operation": "read" if is_read else "write",
                "action": action.value,
            },
        )
        if action is ErrorAction.STOP:
            await self.pause_point()
        return action

    # -- other verbs ------------------------------------------------------------------------

    def set_speed(self, speed: int) -> None:
        """The ``block-job-set-speed`` verb."""
        check_verb(self._id, self._status, JobVerb.SET_SPEED)
        if speed < 0:
            raise BlockBackupError("Parameter 'speed' expects a non-negative value")
        self._speed = speed
        self.rate_limit.set_speed(speed)
        self.on_speed_changed()
        self._kick.set()

    def complete(self) -> None:
        """The ``job-complete`` verb; only jobs with a ready state accept it (not backup)."""
        check_verb(self._id, self._status, JobVerb.COMPLETE)
        raise BlockBackupError(f"The active block job '{self._id}' cannot be completed")

    async def cancel(self, force: bool = False) -> None:
        """The ``job-cancel`` verb (``force`` makes no difference: every cancel is forced).

        While created/running/paused this only requests the cancel: the events follow
        when :meth:`run` has unwound (see :meth:`JobManager.wait_concluded`). In
        waiting/pending (and before start) the job is aborted before this returns. A job
        already committing its result cannot be cancelled any more and completes.
        """
        del force
        check_verb(self._id, self._status, JobVerb.CANCEL)
        if self._finalizing:
            return
        self._request_cancel()
        if self._run_done.is_set():
            txn = self._txn
            assert txn is not None
            task = txn._start_abort(self)
            if task is not None:
                await asyncio.shield(task)

    def _request_cancel(self) -> None:
        """Mark the job cancelled and stop its run (QEMU's forced ``job_cancel_async``)."""
        if self._user_paused:
            self._user_paused = False
            self.io_status = IoStatus.OK
            self.stopped_error = self.stopped_operation = None
            self._update_settled()
            self._resume()
        self._cancelled = True
        if not self._started:
            self._run_done.set()
        elif self._run_task is not None and not self._run_task.done():
            self._run_task.cancel()

    async def finalize(self) -> None:
        """The ``job-finalize`` verb: prepare and commit (or abort) the whole transaction."""
        check_verb(self._id, self._status, JobVerb.FINALIZE)
        txn = self._txn
        assert txn is not None
        await self.manager._run_owned(txn._finalize(), f"job {self._id} finalize")

    def dismiss(self) -> None:
        """The ``job-dismiss`` verb: a concluded job goes ``null`` and is forgotten."""
        check_verb(self._id, self._status, JobVerb.DISMISS)
        self._set_status(JobStatus.NULL)

    # -- life-cycle internals ---------------------------------------------------------------

    def _update_rc(self) -> None:
        """Fix the outcome once the run is over: a failed or cancelled job goes aborting."""
        if self._error is None and self._cancelled:
            self._error = _CANCELED_TEXT
        if self._error is not None:
            self._set_status(JobStatus.ABORTING)

    async def _run_phase(self) -> None:
        self.busy = True
        await self.pause_point()
        await self.run()

    def _on_run_done(self, task: asyncio.Task[None]) -> None:
        self.busy = False
        if task.cancelled():
            self._cancelled = True
        elif (exc := task.exception()) is not None:
            if not isinstance(exc, OSError | BlockBackupError):
                _log.error("job %s failed unexpectedly", self._id, exc_info=exc)
            self._error = _error_text(exc)
        txn = self._txn
        assert txn is not None
        # Statuses change before anyone waiting for the run's end can look at the job.
        txn._job_completed(self)

    def _completed_event_data(self) -> dict[str, Any]:
        return {
            "type": self.job_type,
            "device": self._id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self._speed,
        }

    # -- introspection ----------------------------------------------------------------------

    def query_jobs_info(self) -> dict[str, Any]:
        """This job's entry of ``query-jobs``."""
        info: dict[str, Any] = {
            "id": self._id,
            "type": self.job_type,
            "status": self._status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self._error is not None:
            info["error"] = self._error
        return info

    def query_block_jobs_info(self) -> dict[str, Any]:
        """This job's entry of ``query-block-jobs``."""
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self._id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.paused,
            "speed": self._speed,
            "io-status": self.io_status.value,
            "ready": self._status in (JobStatus.READY, JobStatus.STANDBY),
            "status": self._status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self._error is not None:
            info["error"] = self._error
        return info

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._id!r} {self._status}>"


class JobTxn:
    """Jobs that complete together (``transaction`` with ``completion-mode``).

    ``"grouped"``: every job waits in ``waiting`` until all finished running; if any
    fails or is cancelled the others are cancelled and all abort, otherwise all go
    ``pending`` and are prepared and committed together. ``"individual"`` (the default)
    means each job completes on its own: :meth:`JobManager.register` gives every job of
    an individual transaction a transaction of its own.
    """

    def __init__(self, completion_mode: CompletionMode = "individual") -> None:
        if completion_mode not in ("individual", "grouped"):
            raise ValueError(f"bad completion mode {completion_mode!r}")
        self.completion_mode: CompletionMode = completion_mode
        #: Jobs not concluded yet, in registration order.
        self.jobs: list[Job] = []
        self.aborting = False
        self._lock = asyncio.Lock()

    def _job_completed(self, job: Job) -> None:
        """A job's run is over (QEMU ``job_completed``): move it on, start what follows."""
        job._update_rc()
        job._run_done.set()
        if job.error is not None:
            self._start_abort(job)
            return
        job._set_status(JobStatus.WAITING)
        if any(not j._run_done.is_set() for j in self.jobs):
            return
        for j in self.jobs:
            j._set_status(JobStatus.PENDING)
            if not j.auto_finalize:
                j._emit("BLOCK_JOB_PENDING", {"type": j.job_type, "id": j.id})
        if all(j.auto_finalize for j in self.jobs):
            job.manager._spawn(self._finalize(), f"txn of {job.id} finalize")

    async def _finalize(self) -> None:
        """Prepare every job, then commit all or abort all (QEMU ``job_do_finalize``)."""
        async with self._lock:
            if self.aborting or not self.jobs:
                return
            if any(j.status is not JobStatus.PENDING for j in self.jobs):
                return
            for j in list(self.jobs):
                if j.error is None and not j.cancelled:
                    try:
                        await j.prepare()
                    except Exception as exc:
                        j._error = _error_text(exc)
                if self.aborting:
                    # A cancel arrived meanwhile; its abort chain takes over.
                    return
                j._update_rc()
                if j.error is not None:
                    self.aborting = True
                    await self._abort_locked(j)
                    return
            for j in self.jobs:
                j._finalizing = True
            for j in list(self.jobs):
                await self._finalize_single(j)

    def _start_abort(self, trigger: Job) -> asyncio.Task[None] | None:
        """Start aborting the transaction (QEMU ``job_completed_txn_abort``), once.

        Returns the task doing it, or None when an abort was already under way.
        """
        if self.aborting:
            return None
        self.aborting = True
        return trigger.manager._spawn(self._abort(trigger), f"txn of {trigger.id} abort")

    async def _abort(self, trigger: Job) -> None:
        async with self._lock:
            await self._abort_locked(trigger)

    async def _abort_locked(self, trigger: Job) -> None:
        """Cancel the other jobs, wait for their runs to end, abort them all."""
        for j in self.jobs:
            if j is not trigger:
                j._request_cancel()
        while self.jobs:
            j = self.jobs[0]
            await j._run_done.wait()
            await self._finalize_single(j)

    async def _finalize_single(self, job: Job) -> None:
        """commit XOR abort, clean, the final event, concluded (and null)."""
        job._update_rc()
        try:
            if job.error is None:
                await job.commit()
            else:
                await job.abort()
        except Exception:
            _log.exception("job %s: commit/abort failed", job.id)
        try:
            await job.clean()
        except Exception:
            _log.exception("job %s: clean failed", job.id)
        if job._started:
            data = job._completed_event_data()
            if job.cancelled:
                job._emit("BLOCK_JOB_CANCELLED", data)
            else:
                if job.error is not None:
                    data["error"] = job.error
                job._emit("BLOCK_JOB_COMPLETED", data)
        self.jobs.remove(job)
        job._set_status(JobStatus.CONCLUDED)
        if job.auto_dismiss or not job._started:
            job._set_status(JobStatus.NULL)


class JobManager:
    """Owns the jobs by ID, their tasks and the event bus they report to.

    Every task it creates (a job's run, completion chains) is tracked and awaited by
    :meth:`aclose`, which first cancels every job gracefully.
    """

    def __init__(self, events: EventBus | None = None) -> None:
        self.events = events if events is not None else EventBus()
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def jobs(self) -> list[Job]:
        """Every job not yet ``null``, in creation order."""
        return list(self._jobs.values())

    def validate_job_id(self, job_id: str) -> None:
        """Raise QEMU's error if ``job_id`` is malformed or already in use."""
        if not _JOB_ID_RE.fullmatch(job_id) or not job_id.isascii():
            raise BlockBackupError(f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise BlockBackupError(f"Job ID '{job_id}' already in use")

    def register(self, job: Job, txn: JobTxn | None = None) -> None:
        """Validate the ID and create the job (``created``), then apply its speed.

        A negative speed fails after ``created`` was sent: the job goes ``null`` at once,
        as in QEMU.
        """
        if self._closed:
            raise BlockBackupError("The job manager is shut down")
        if job.manager is not self or job.status is not JobStatus.UNDEFINED:
            raise ValueError(f"{job!r} cannot be registered here")
        self.validate_job_id(job.id)
        if txn is None or txn.completion_mode == "individual":
            txn = JobTxn()
        txn.jobs.append(job)
        job._txn = txn
        self._jobs[job.id] = job
        job._set_status(JobStatus.CREATED)
        if job._requested_speed:
            try:
                job.set_speed(job._requested_speed)
            except BlockBackupError:
                self.discard(job)
                raise

    def discard(self, job: Job) -> None:
        """Drop a created job that failed to set up (``created`` -> ``null``, no hooks)."""
        if job.status is not JobStatus.CREATED or job._started:
            raise ValueError(f"{job!r} cannot be discarded")
        assert job._txn is not None
        job._txn.jobs.remove(job)
        job._set_status(JobStatus.NULL)

    def start(self, job: Job) -> None:
        """Start a created job: ``running``, and its run task begins."""
        if job.manager is not self or job.status is not JobStatus.CREATED or job._started:
            raise ValueError(f"{job!r} cannot be started")
        if job.cancelled:
            return
        job._started = True
        job._set_status(JobStatus.RUNNING)
        # The run's outcome (including its exception) is consumed by _on_run_done.
        task = self._spawn(job._run_phase(), f"job {job.id} run", log_errors=False)
        job._run_task = task
        task.add_done_callback(job._on_run_done)

    def get(self, job_id: str) -> Job:
        """The job for ``job-*`` commands."""
        try:
            return self._jobs[job_id]
        except KeyError:
            raise BlockBackupError("Job not found") from None

    def get_block_job(self, job_id: str) -> Job:
        """The job for legacy ``block-job-*`` commands."""
        try:
            return self._jobs[job_id]
        except KeyError:
            raise DeviceNotActiveError(f"Block job '{job_id}' not found") from None

    async def wait_concluded(self, job: Job) -> None:
        """Return once ``job`` is concluded (or null)."""
        await job._concluded.wait()

    async def wait_settled(self, job: Job) -> None:
        """Return once ``job`` is concluded (or null) or paused by an error policy: the
        moments its owner must act (see :attr:`Job.paused_on_error`)."""
        await job._settled.wait()

    async def cancel_all(self) -> None:
        """Cancel every job and wait until each is gone, sending the usual events.

        For daemon shutdown (``quit``): concluded jobs are dismissed too.
        """
        while self._jobs:
            job = next(iter(self._jobs.values()))
            if job.status is not JobStatus.CONCLUDED:
                if job.status in (JobStatus.ABORTING,) or job._finalizing:
                    pass
                else:
                    await job.cancel(force=True)
                await self.wait_concluded(job)
            if job.status is JobStatus.CONCLUDED:
                job.dismiss()

    async def aclose(self) -> None:
        """Cancel every job, then wait for every task the manager owns."""
        self._closed = True
        try:
            await self.cancel_all()
            while self._tasks:
                await asyncio.wait(set(self._tasks))
        except BaseException:
            for task in self._tasks:
                task.cancel()
            raise

    # -- internals --------------------------------------------------------------------------

    def _forget(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    def _spawn(
        self, coro: Coroutine[Any, Any, None], name: str, *, log_errors: bool = True
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._log_task_error if log_errors else self._tasks.discard)
        return task

    def _log_task_error(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("task %s failed", task.get_name(), exc_info=exc)

    async def _run_owned(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` in an owned task and wait for it; cancelling the caller stops only
        the waiting, never the work."""
        await asyncio.shield(self._spawn(coro, name))
