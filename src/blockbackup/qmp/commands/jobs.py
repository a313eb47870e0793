"""Job control: ``query-jobs``, the generic ``job-*`` verbs and the legacy ``block-job-*``.

Why two families: QEMU keeps both; ``job-*`` name the job by ``id`` and fail with
``GenericError`` "Job not found", ``block-job-*`` (mostly) by ``device`` and fail with
``DeviceNotActive`` "Block job 'x' not found". The verbs themselves live on the job.
"""

from __future__ import annotations

from typing import Any

from blockbackup.errors import BlockBackupError
from blockbackup.jobs.job import Job
from blockbackup.qmp.context import Context
from blockbackup.qmp.registry import Args, command, event
from blockbackup.qmp.schema import BOOL, INT, STR, Array, Enum, Member, Struct

_ID = Struct("q_job_id", [Member("id", STR)])
_DEVICE = Struct("q_block_job_device", [Member("device", STR)])


def _job(ctx: Context, args: Args) -> Job:
    return ctx.services.jobs.get(args["id"])


def _block_job(ctx: Context, job_id: str) -> Job:
    return ctx.services.jobs.get_block_job(job_id)


@command("query-jobs", returns=Array(Struct("JobInfo", open=True)))
async def query_jobs(ctx: Context, args: Args) -> list[dict[str, Any]]:
    return [job.query_jobs_info() for job in ctx.services.jobs.jobs]


@command("query-block-jobs", returns=Array(Struct("BlockJobInfo", open=True)))
async def query_block_jobs(ctx: Context, args: Args) -> list[dict[str, Any]]:
    return [job.query_block_jobs_info() for job in ctx.services.jobs.jobs]


@command("job-pause", args=_ID)
async def job_pause(ctx: Context, args: Args) -> None:
    _job(ctx, args).pause()


@command("job-resume", args=_ID)
async def job_resume(ctx: Context, args: Args) -> None:
    _job(ctx, args).resume()


@command("job-cancel", args=_ID)
async def job_cancel(ctx: Context, args: Args) -> None:
    await _job(ctx, args).cancel(force=True)


@command("job-complete", args=_ID)
async def job_complete(ctx: Context, args: Args) -> None:
    _job(ctx, args).complete()


@command("job-finalize", args=_ID)
async def job_finalize(ctx: Context, args: Args) -> None:
    await _job(ctx, args).finalize()


@command("job-dismiss", args=_ID)
async def job_dismiss(ctx: Context, args: Args) -> None:
    _job(ctx, args).dismiss()


@command("block-job-pause", args=_DEVICE)
async def block_job_pause(ctx: Context, args: Args) -> None:
    _block_job(ctx, args["device"]).pause()


@command("block-job-resume", args=_DEVICE)
async def block_job_resume(ctx: Context, args: Args) -> None:
    _block_job(ctx, args["device"]).resume()


@command(
    "block-job-cancel",
    args=Struct(
        "q_obj_block-job-cancel-arg",
        [Member("device", STR), Member("force", BOOL, default=False)],
    ),
)
async def block_job_cancel(ctx: Context, args: Args) -> None:
    job = _block_job(ctx, args["device"])
    if job.user_paused and not args["force"]:
        raise BlockBackupError(f"The block job for device '{args['device']}' is currently paused")
    await job.cancel(force=args["force"])


@command(
    "block-job-set-speed",
    args=Struct("q_obj_block-job-set-speed-arg", [Member("device", STR), Member("speed", INT)]),
)
async def block_job_set_speed(ctx: Context, args: Args) -> None:
    _block_job(ctx, args["device"]).set_speed(args["speed"])


@command("block-job-complete", args=_DEVICE)
async def block_job_complete(ctx: Context, args: Args) -> None:
    _block_job(ctx, args["device"]).complete()


@command("block-job-finalize", args=_ID)
async def block_job_finalize(ctx: Context, args: Args) -> None:
    await _block_job(ctx, args["id"]).finalize()


@command("block-job-dismiss", args=_ID)
async def block_job_dismiss(ctx: Context, args: Args) -> None:
    _block_job(ctx, args["id"]).dismiss()


_JOB_TYPE = Enum("JobType", ("commit", "stream", "mirror", "backup", "create", "amend"))
_JOB_STATUS = Enum(
    "JobStatus",
    (
        "undefined",
        "created",
        "running",
        "paused",
        "ready",
        "standby",
        "waiting",
        "pending",
        "aborting",
        "concluded",
        "null",
    ),
)
_COMPLETED = [
    Member("type", _JOB_TYPE),
    Member("device", STR),
    Member("len", INT),
    Member("offset", INT),
    Member("speed", INT),
]
event(
    "JOB_STATUS_CHANGE",
    Struct("q_JOB_STATUS_CHANGE", [Member("id", STR), Member("status", _JOB_STATUS)]),
)
event(
    "BLOCK_JOB_COMPLETED",
    Struct("q_BLOCK_JOB_COMPLETED", [*_COMPLETED, Member("error", STR, optional=True)]),
)
event("BLOCK_JOB_CANCELLED", Struct("q_BLOCK_JOB_CANCELLED", _COMPLETED))
event(
    "BLOCK_JOB_ERROR",
    Struct(
        "q_BLOCK_JOB_ERROR",
        [
            Member("device", STR),
            Member("operation", Enum("IoOperationType", ("read", "write"))),
            Member("action", Enum("BlockErrorAction", ("ignore", "report", "stop"))),
        ],
    ),
)
event(
    "BLOCK_JOB_PENDING",
    Struct("q_BLOCK_JOB_PENDING", [Member("type", _JOB_TYPE), Member("id", STR)]),
)
