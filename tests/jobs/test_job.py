"""The generic job life cycle: exact event sequences, verbs, error policies, transactions.

The job under test runs a script that the test feeds step by step through a queue, and
every wait is an event handshake: nothing sleeps and nothing depends on wall-clock time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from blockbackup.errors import BlockBackupError, DeviceNotActiveError
from blockbackup.events import EventBus, EventSubscription
from blockbackup.jobs.job import Job, JobManager, JobTxn
from blockbackup.jobs.status import BlockdevOnError, ErrorAction, IoStatus, JobStatus

pytestmark = pytest.mark.asyncio

Step = Callable[["ScriptedJob"], Awaitable[None]]
LEN = 100


class ScriptedJob(Job):
    """A job whose run() executes steps pushed by the test, until it receives None."""

    job_type = "backup"

    def __init__(self, job_id: str, manager: JobManager, **kwargs: Any) -> None:
        super().__init__(job_id, manager, **kwargs)
        self.script: asyncio.Queue[Step | None] = asyncio.Queue()
        self.hooks: list[str] = []
        self.actions: list[ErrorAction] = []
        self.prepare_error: Exception | None = None
        self.speed_changes: list[int] = []

    async def run(self) -> None:
        self.hooks.append("run")
        self.progress_total = LEN
        while (step := await self.script.get()) is not None:
            await step(self)

    async def prepare(self) -> None:
        self.hooks.append("prepare")
        if self.prepare_error is not None:
            raise self.prepare_error

    async def commit(self) -> None:
        self.hooks.append("commit")

    async def abort(self) -> None:
        self.hooks.append("abort")

    async def clean(self) -> None:
        self.hooks.append("clean")

    def on_speed_changed(self) -> None:
        self.speed_changes.append(self.speed)

    async def steps(self, *steps: Step) -> None:
        """Run ``steps`` in the job and return once they are done."""
        done = asyncio.Event()

        async def barrier(job: ScriptedJob) -> None:
            done.set()

        for step in (*steps, barrier):
            self.script.put_nowait(step)
        await done.wait()

    def push(self, *steps: Step | None) -> None:
        """Queue steps without waiting (None ends the run)."""
        for step in steps:
            self.script.put_nowait(step)


def progress(n: int) -> Step:
    async def step(job: ScriptedJob) -> None:
        job.progress_current += n

    return step


def fail(err: int) -> Step:
    async def step(job: ScriptedJob) -> None:
        raise OSError(err, os.strerror(err))

    return step


def io_error(policy: BlockdevOnError, err: int, *, is_read: bool = False) -> Step:
    """One I/O error handled as a block job would: REPORT raises, others retry (and succeed)."""

    async def step(job: ScriptedJob) -> None:
        exc = OSError(err, os.strerror(err))
        action = await job.handle_error(policy, exc, is_read=is_read)
        job.actions.append(action)
        if action is ErrorAction.REPORT:
            raise exc

    return step


async def pause_point(job: ScriptedJob) -> None:
    await job.pause_point()


class Recorder:
    """Keeps every event of a subscription; can wait for a particular one."""

    def __init__(self, sub: EventSubscription) -> None:
        self.sub = sub
        self.events: list[dict[str, Any]] = []

    @staticmethod
    def label(event: dict[str, Any]) -> str:
        if event["event"] == "JOB_STATUS_CHANGE":
            return str(event["data"]["status"])
        return str(event["event"])

    async def until(self, label: str, job_id: str = "job0") -> dict[str, Any]:
        while True:
            event = await self.sub.get()
            self.events.append(event)
            data = event.get("data", {})
            if self.label(event) == label and job_id in (data.get("id"), data.get("device")):
                return event

    def _sync(self) -> None:
        self.events.extend(self.sub.drain())

    def names(self, job_id: str = "job0") -> list[str]:
        """The labels of ``job_id``'s events so far: a status, or an event name."""
        self._sync()
        return [
            self.label(e)
            for e in self.events
            if job_id in (e.get("data", {}).get("id"), e.get("data", {}).get("device"))
        ]

    def all(self) -> list[tuple[str, str]]:
        self._sync()
        out = []
        for e in self.events:
            data = e.get("data", {})
            out.append((str(data.get("id", data.get("device"))), self.label(e)))
        return out

    def data(self, name: str, job_id: str = "job0") -> dict[str, Any]:
        self._sync()
        (found,) = [
            e["data"]
            for e in self.events
            if e["event"] == name and job_id in (e["data"].get("id"), e["data"].get("device"))
        ]
        return dict(found)


@pytest.fixture(autouse=True)
def _no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Failures inside owned tasks are only logged: make them fail the test."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert errors == []


@pytest_asyncio.fixture
async def manager() -> AsyncIterator[JobManager]:
    mgr = JobManager()
    yield mgr
    await mgr.aclose()
    assert mgr.jobs == []


@pytest.fixture
def rec(manager: JobManager) -> Recorder:
    return Recorder(manager.events.subscribe())


def make(manager: JobManager, job_id: str = "job0", **kwargs: Any) -> ScriptedJob:
    job = ScriptedJob(job_id, manager, **kwargs)
    manager.register(job)
    manager.start(job)
    return job


def completed(offset: int = LEN, **extra: Any) -> dict[str, Any]:
    return {"type": "backup", "device": "job0", "len": LEN, "offset": offset, "speed": 0, **extra}


async def test_success_auto(manager: JobManager, rec: Recorder) -> None:
    job = make(manager)
    await job.steps(progress(40), pause_point, progress(60))
    assert job.query_jobs_info() == {
        "id": "job0",
        "type": "backup",
        "status": "running",
        "current-progress": 100,
        "total-progress": 100,
    }
    job.push(None)
    await manager.wait_concluded(job)
    assert rec.names() == [
        "created",
        "running",
        "waiting",
        "pending",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.data("BLOCK_JOB_COMPLETED") == completed()
    assert job.hooks == ["run", "prepare", "commit", "clean"]
    assert job.status is JobStatus.NULL
    assert job.error is None
    assert manager.jobs == []
    with pytest.raises(BlockBackupError, match=r"^Job not found$"):
        manager.get("job0")
    # The ID is free again once the job is null.
    manager.validate_job_id("job0")


async def test_event_shape(manager: JobManager) -> None:
    bus = EventBus(clock=lambda: 1_700_000_000_123_456_789)
    with bus.subscribe() as sub, bus.subscribe(["B"]) as only_b:
        bus.emit("A", {"x": 1})
        bus.emit("B", None)
        assert sub.drain() == [
            {
                "timestamp": {"seconds": 1_700_000_000, "microseconds": 123_456},
                "event": "A",
                "data": {"x": 1},
            },
            {"timestamp": {"seconds": 1_700_000_000, "microseconds": 123_456}, "event": "B"},
        ]
        assert only_b.get_nowait()["event"] == "B"
        with pytest.raises(asyncio.QueueEmpty):
            only_b.get_nowait()
    bus.emit("C", None)
    assert sub.closed
    assert sub.drain() == []
    # The real clock gives integers.
    with manager.events.subscribe() as sub2:
        manager.events.emit("D", {})
        stamp = (await sub2.get())["timestamp"]
        assert isinstance(stamp["seconds"], int)
        assert isinstance(stamp["microseconds"], int)
        assert 0 <= stamp["microseconds"] < 1_000_000


async def test_manual_finalize(manager: JobManager, rec: Recorder) -> None:
    job = make(manager, auto_finalize=False)
    job.push(progress(LEN))
    with pytest.raises(BlockBackupError) as info:
        await job.finalize()
    assert str(info.value) == "Job 'job0' in state 'running' cannot accept command verb 'finalize'"
    job.push(None)
    assert await rec.until("BLOCK_JOB_PENDING") == {
        "timestamp": rec.events[-1]["timestamp"],
        "event": "BLOCK_JOB_PENDING",
        "data": {"type": "backup", "id": "job0"},
    }
    assert job.status is JobStatus.PENDING
    assert job.hooks == ["run"]
    with pytest.raises(BlockBackupError, match="state 'pending' cannot accept command verb 'dis"):
        job.dismiss()
    await job.finalize()
    # Everything happened before finalize() returned.
    assert rec.names() == [
        "created",
        "running",
        "waiting",
        "pending",
        "BLOCK_JOB_PENDING",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert job.hooks == ["run", "prepare", "commit", "clean"]


async def test_manual_dismiss(manager: JobManager, rec: Recorder) -> None:
    job = make(manager, auto_dismiss=False)
    job.push(progress(LEN), None)
    await manager.wait_concluded(job)
    assert rec.names()[-3:] == ["pending", "BLOCK_JOB_COMPLETED", "concluded"]
    assert manager.get("job0") is job
    assert job.query_block_jobs_info()["status"] == "concluded"
    with pytest.raises(BlockBackupError) as info:
        await job.cancel()
    assert str(info.value) == "Job 'job0' in state 'concluded' cannot accept command verb 'cancel'"
    job.dismiss()
    assert rec.names()[-1] == "null"
    assert manager.jobs == []


async def test_cancel_while_running(manager: JobManager, rec: Recorder) -> None:
    job = make(manager, auto_dismiss=False)
    await job.steps(progress(30))
    await job.cancel()
    await manager.wait_concluded(job)
    assert rec.names() == [
        "created",
        "running",
        "aborting",
        "BLOCK_JOB_CANCELLED",
        "concluded",
    ]
    assert rec.data("BLOCK_JOB_CANCELLED") == completed(offset=30)
    assert job.hooks == ["run", "abort", "clean"]
    assert job.error == "Operation canceled"
    assert job.query_jobs_info() == {
        "id": "job0",
        "type": "backup",
        "status": "concluded",
        "current-progress": 30,
        "total-progress": LEN,
        "error": "Operation canceled",
    }
    job.dismiss()


async def test_cancel_while_paused(manager: JobManager, rec: Recorder) -> None:
    job = make(manager)
    await job.steps()  # inside run()
    job.pause()
    job.push(pause_point)
    await rec.until("paused")
    info = job.query_block_jobs_info()
    assert info["paused"] is True
    assert info["busy"] is False
    assert info["status"] == "paused"
    await job.cancel()
    await manager.wait_concluded(job)
    # paused -> aborting is not a legal transition: the job resumes to unwind.
    assert rec.names() == [
        "created",
        "running",
        "paused",
        "running",
        "aborting",
        "BLOCK_JOB_CANCELLED",
        "concluded",
        "null",
    ]
    assert job.hooks == ["run", "abort", "clean"]


async def test_cancel_in_pending(manager: JobManager, rec: Recorder) -> None:
    job = make(manager, auto_finalize=False)
    job.push(progress(LEN), None)
    await rec.until("BLOCK_JOB_PENDING")
    await job.cancel()
    # Synchronous, as in QEMU: the events are out before cancel() returns.
    assert rec.names()[-6:] == [
        "pending",
        "BLOCK_JOB_PENDING",
        "aborting",
        "BLOCK_JOB_CANCELLED",
        "concluded",
        "null",
    ]
    assert rec.data("BLOCK_JOB_CANCELLED") == completed(offset=LEN)
    assert job.hooks == ["run", "abort", "clean"]


async def test_cancel_before_start(manager: JobManager, rec: Recorder) -> None:
    job = ScriptedJob("job0", manager)
    manager.register(job)
    await job.cancel()
    # Never started: no BLOCK_JOB_CANCELLED, always dismissed.
    assert rec.names() == ["created", "aborting", "concluded", "null"]
    assert job.hooks == ["abort", "clean"]


async def test_failure_report(manager: JobManager, rec: Recorder) -> None:
    job = make(manager, auto_dismiss=False)
    job.push(progress(10), io_error(BlockdevOnError.REPORT, errno.EIO))
    await manager.wait_concluded(job)
    assert rec.names() == [
        "created",
        "running",
        "BLOCK_JOB_ERROR",
        "aborting",
        "BLOCK_JOB_COMPLETED",
        "concluded",
    ]
    assert rec.data("BLOCK_JOB_ERROR") == {
        "device": "job0",
        "operation": "write",
        "action": "report",
    }
    assert rec.data("BLOCK_JOB_COMPLETED") == completed(offset=10, error="Input/output error")
    assert job.hooks == ["run", "abort", "clean"]
    assert job.query_jobs_info()["error"] == "Input/output error"
    assert job.query_block_jobs_info()["error"] == "Input/output error"
    job.dismiss()


async def test_failure_plain_exception(manager: JobManager, rec: Recorder) -> None:
    job = make(manager)
    job.push(fail(errno.ENOSPC))
    await manager.wait_concluded(job)
    assert rec.names() == [
        "created",
        "running",
        "aborting",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.data("BLOCK_JOB_COMPLETED")["error"] == "No space left on device"


async def test_prepare_failure(manager: JobManager, rec: Recorder) -> None:
    job = make(manager)
    job.prepare_error = OSError(errno.EIO, "Input/output error")
    job.push(None)
    await manager.wait_concluded(job)
    assert rec.names() == [
        "created",
        "running",
        "waiting",
        "pending",
        "aborting",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.data("BLOCK_JOB_COMPLETED")["error"] == "Input/output error"
    assert job.hooks == ["run", "prepare", "abort", "clean"]


@pytest.mark.parametrize(
    ("policy", "err", "io_status"),
    [
        (BlockdevOnError.STOP, errno.EIO, IoStatus.FAILED),
        (BlockdevOnError.STOP, errno.ENOSPC, IoStatus.NOSPACE),
        (BlockdevOnError.ENOSPC, errno.ENOSPC, IoStatus.NOSPACE),
        (BlockdevOnError.AUTO, errno.ENOSPC, IoStatus.NOSPACE),
    ],
)
async def test_stop_policy_then_resume(
    manager: JobManager, rec: Recorder, policy: BlockdevOnError, err: int, io_status: IoStatus
) -> None:
    job = make(manager)
    job.push(progress(50), io_error(policy, err))
    await rec.until("paused")
    assert rec.data("BLOCK_JOB_ERROR") == {"device": "job0", "operation": "write", "action": "stop"}
    info = job.query_block_jobs_info()
    assert info == {
        "type": "backup",
        "device": "job0",
        "len": LEN,
        "offset": 50,
        "busy": False,
        "paused": True,
        "speed": 0,
        "io-status": io_status.value,
        "ready": False,
        "status": "paused",
        "auto-finalize": True,
        "auto-dismiss": True,
    }
    with pytest.raises(BlockBackupError, match=r"^Job is already paused$"):
        job.pause()
    job.resume()
    assert job.io_status is IoStatus.OK
    await job.steps(progress(50))
    assert job.actions == [ErrorAction.STOP]
    job.push(None)
    await manager.wait_concluded(job)
    assert rec.names() == [
        "created",
        "running",
        "BLOCK_JOB_ERROR",
        "paused",
        "running",
        "waiting",
        "pending",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert "error" not in rec.data("BLOCK_JOB_COMPLETED")


async def test_enospc_policy_reports_other_errors(manager: JobManager, rec: Recorder) -> None:
    job = make(manager)
    job.push(io_error(BlockdevOnError.ENOSPC, errno.EIO, is_read=True))
    await manager.wait_concluded(job)
    assert rec.data("BLOCK_JOB_ERROR") == {
        "device": "job0",
        "operation": "read",
        "action": "report",
    }
    assert rec.data("BLOCK_JOB_COMPLETED")["error"] == "Input/output error"


async def test_ignore_policy(manager: JobManager, rec: Recorder) -> None:
    job = make(manager)
    job.push(io_error(BlockdevOnError.IGNORE, errno.EIO, is_read=True), progress(LEN), None)
    await manager.wait_concluded(job)
    assert rec.names() == [
        "created",
        "running",
        "BLOCK_JOB_ERROR",
        "waiting",
        "pending",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.data("BLOCK_JOB_ERROR") == {
        "device": "job0",
        "operation": "read",
        "action": "ignore",
    }
    assert job.actions == [ErrorAction.IGNORE]
    assert job.io_status is IoStatus.OK


async def test_pause_resume(manager: JobManager, rec: Recorder) -> None:
    job = make(manager, auto_finalize=False)
    with pytest.raises(BlockBackupError, match=r"^Can't resume a job that was not paused$"):
        job.resume()
    job.pause()
    assert job.paused
    assert job.status is JobStatus.RUNNING  # until the job reaches a pause point
    with pytest.raises(BlockBackupError, match=r"^Job is already paused$"):
        job.pause()
    job.push(pause_point)
    await rec.until("paused")
    job.resume()
    await rec.until("running")
    assert not job.paused
    job.push(None)
    await rec.until("BLOCK_JOB_PENDING")
    with pytest.raises(BlockBackupError) as info:
        job.pause()
    assert str(info.value) == "Job 'job0' in state 'pending' cannot accept command verb 'pause'"
    with pytest.raises(BlockBackupError, match=r"^Can't resume a job that was not paused$"):
        job.resume()
    await job.finalize()
    assert rec.names()[:4] == ["created", "running", "paused", "running"]


async def test_pause_before_start_and_wait_pause_requested(
    manager: JobManager, rec: Recorder
) -> None:
    job = ScriptedJob("job0", manager)
    manager.register(job)
    job.pause()  # created accepts pause: the job pauses at its first pause point
    manager.start(job)
    await rec.until("paused")
    job.resume()
    woke = asyncio.Event()

    async def long_copy(job: ScriptedJob) -> None:
        await job.wait_pause_requested()
        woke.set()
        await job.pause_point()

    job.push(long_copy)
    await rec.until("running")
    job.pause()
    await woke.wait()
    await rec.until("paused")
    job.resume()
    job.push(None)
    await manager.wait_concluded(job)
    assert rec.names()[:6] == ["created", "running", "paused", "running", "paused", "running"]


async def test_complete_is_rejected(manager: JobManager) -> None:
    job = make(manager)
    with pytest.raises(BlockBackupError) as info:
        job.complete()
    assert str(info.value) == "Job 'job0' in state 'running' cannot accept command verb 'complete'"
    job.push(None)
    await manager.wait_concluded(job)


async def test_set_speed(manager: JobManager, rec: Recorder) -> None:
    job = make(manager)
    with pytest.raises(BlockBackupError, match=r"^Parameter 'speed' expects a non-negative value$"):
        job.set_speed(-5)
    job.set_speed(1 << 20)
    assert job.speed == 1 << 20
    assert job.rate_limit.speed == 1 << 20
    assert job.speed_changes == [1 << 20]
    assert job.query_block_jobs_info()["speed"] == 1 << 20
    job.push(None)
    await manager.wait_concluded(job)
    assert rec.data("BLOCK_JOB_COMPLETED")["speed"] == 1 << 20


async def test_negative_speed_at_creation(manager: JobManager, rec: Recorder) -> None:
    job = ScriptedJob("job0", manager, speed=-1)
    with pytest.raises(BlockBackupError, match=r"^Parameter 'speed' expects a non-negative value$"):
        manager.register(job)
    assert rec.names() == ["created", "null"]
    assert manager.jobs == []
    ok = ScriptedJob("job0", manager, speed=4096)
    manager.register(ok)
    assert ok.speed == 4096
    manager.discard(ok)


async def test_rate_limit_wait_woken_by_speed_change(manager: JobManager) -> None:
    job = make(manager, speed=1)
    waiting = asyncio.Event()

    async def throttled(job: ScriptedJob) -> None:
        job.rate_limit.charge(1 << 30)  # ~34 years of budget at 1 B/s
        waiting.set()
        await job.rate_limit_wait(4096)
        job.progress_current = LEN

    job.push(throttled)
    await waiting.wait()
    await asyncio.sleep(0)  # let the job enter its wait
    assert job.busy is False
    job.set_speed(0)  # unlimited: the sleeper wakes and proceeds
    job.push(None)
    await manager.wait_concluded(job)
    assert job.error is None
    assert job.progress_current == LEN


async def test_job_id_validation(manager: JobManager) -> None:
    for bad in ["1abc", "a#b", "", "-x", "a b", "é"]:
        with pytest.raises(BlockBackupError) as info:
            manager.validate_job_id(bad)
        assert str(info.value) == f"Invalid job ID '{bad}'"
    for good in ["a", "job0", "A-b.c_d9"]:
        manager.validate_job_id(good)
    job = ScriptedJob("job0", manager)
    manager.register(job)
    with pytest.raises(BlockBackupError, match=r"^Job ID 'job0' already in use$"):
        manager.register(ScriptedJob("job0", manager))
    with pytest.raises(BlockBackupError, match=r"^Job not found$"):
        manager.get("nojob")
    with pytest.raises(DeviceNotActiveError) as dna:
        manager.get_block_job("nojob")
    assert str(dna.value) == "Block job 'nojob' not found"
    assert dna.value.error_class == "DeviceNotActive"
    assert manager.get_block_job("job0") is job
    manager.discard(job)


async def test_grouped_txn_failure_cancels_sibling(manager: JobManager, rec: Recorder) -> None:
    txn = JobTxn("grouped")
    a = ScriptedJob("a", manager)
    b = ScriptedJob("b", manager)
    manager.register(a, txn)
    manager.register(b, txn)
    manager.start(a)
    manager.start(b)
    await b.steps(progress(20))
    a.push(io_error(BlockdevOnError.REPORT, errno.EIO))
    await manager.wait_concluded(a)
    await manager.wait_concluded(b)
    assert rec.names("a") == [
        "created",
        "running",
        "BLOCK_JOB_ERROR",
        "aborting",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.names("b") == [
        "created",
        "running",
        "aborting",
        "BLOCK_JOB_CANCELLED",
        "concluded",
        "null",
    ]
    assert rec.data("BLOCK_JOB_COMPLETED", "a")["error"] == "Input/output error"
    assert rec.data("BLOCK_JOB_CANCELLED", "b")["offset"] == 20
    assert a.hooks == ["run", "abort", "clean"]
    assert b.hooks == ["run", "abort", "clean"]


async def test_grouped_txn_waiting_sibling_is_cancelled(manager: JobManager, rec: Recorder) -> None:
    txn = JobTxn("grouped")
    a = ScriptedJob("a", manager)
    b = ScriptedJob("b", manager)
    for job in (a, b):
        manager.register(job, txn)
        manager.start(job)
    a.push(progress(LEN), None)
    await rec.until("waiting", "a")
    b.push(fail(errno.EIO))
    await manager.wait_concluded(b)
    await manager.wait_concluded(a)
    assert rec.names("a") == [
        "created",
        "running",
        "waiting",
        "aborting",
        "BLOCK_JOB_CANCELLED",
        "concluded",
        "null",
    ]
    assert rec.data("BLOCK_JOB_CANCELLED", "a")["offset"] == LEN
    assert rec.names("b")[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert a.hooks == ["run", "abort", "clean"]


async def test_grouped_txn_success(manager: JobManager, rec: Recorder) -> None:
    txn = JobTxn("grouped")
    a = ScriptedJob("a", manager)
    b = ScriptedJob("b", manager, auto_finalize=False)
    for job in (a, b):
        manager.register(job, txn)
        manager.start(job)
    a.push(None)
    await rec.until("waiting", "a")
    assert a.status is JobStatus.WAITING  # held until its sibling finished
    b.push(None)
    await rec.until("BLOCK_JOB_PENDING", "b")
    assert (
        a.query_jobs_info()["status"] == "pending"
    )  # b needs a manual finalize: so does the group
    await b.finalize()
    assert rec.all()[-10:] == [
        ("b", "waiting"),
        ("a", "pending"),
        ("b", "pending"),
        ("b", "BLOCK_JOB_PENDING"),
        ("a", "BLOCK_JOB_COMPLETED"),
        ("a", "concluded"),
        ("a", "null"),
        ("b", "BLOCK_JOB_COMPLETED"),
        ("b", "concluded"),
        ("b", "null"),
    ]
    assert a.hooks == ["run", "prepare", "commit", "clean"]
    assert b.hooks == ["run", "prepare", "commit", "clean"]


async def test_grouped_txn_cancel_waiting_job(manager: JobManager, rec: Recorder) -> None:
    txn = JobTxn("grouped")
    a = ScriptedJob("a", manager)
    b = ScriptedJob("b", manager)
    for job in (a, b):
        manager.register(job, txn)
        manager.start(job)
    a.push(None)
    await rec.until("waiting", "a")
    await a.cancel()  # aborts the group: b is cancelled and awaited before this returns
    assert a.status is JobStatus.NULL
    assert b.status is JobStatus.NULL
    assert rec.names("a")[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert rec.names("b")[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


async def test_individual_txn_jobs_complete_alone(manager: JobManager, rec: Recorder) -> None:
    txn = JobTxn("individual")
    a = ScriptedJob("a", manager)
    b = ScriptedJob("b", manager)
    for job in (a, b):
        manager.register(job, txn)
        manager.start(job)
    a.push(fail(errno.EIO))
    await manager.wait_concluded(a)
    assert b.status is JobStatus.RUNNING
    b.push(None)
    await manager.wait_concluded(b)
    assert "error" not in rec.data("BLOCK_JOB_COMPLETED", "b")
    with pytest.raises(ValueError, match="completion mode"):
        JobTxn("bogus")  # type: ignore[arg-type]


async def test_cancel_all(manager: JobManager, rec: Recorder) -> None:
    make(manager, "running")
    paused = make(manager, "paused")
    pending = make(manager, "pending", auto_finalize=False)
    concluded = make(manager, "concluded", auto_dismiss=False)
    created = ScriptedJob("created", manager)
    manager.register(created)
    paused.pause()
    paused.push(pause_point)
    await rec.until("paused", "paused")
    pending.push(None)
    await rec.until("BLOCK_JOB_PENDING", "pending")
    concluded.push(None)
    await manager.wait_concluded(concluded)

    await manager.cancel_all()

    assert manager.jobs == []
    tail = ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert rec.names("running") == ["created", "running", *tail]
    assert rec.names("paused") == ["created", "running", "paused", "running", *tail]
    assert rec.names("pending")[-5:] == ["BLOCK_JOB_PENDING", *tail]
    assert rec.names("concluded")[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert rec.names("created") == ["created", "aborting", "concluded", "null"]


async def test_aclose_cancels_running_jobs() -> None:
    mgr = JobManager()
    with mgr.events.subscribe() as sub:
        job = ScriptedJob("job0", mgr)
        mgr.register(job)
        mgr.start(job)
        await mgr.aclose()
        assert [Recorder.label(e) for e in sub.drain()] == [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null",
        ]
    with pytest.raises(BlockBackupError):
        mgr.register(ScriptedJob("job1", mgr))
