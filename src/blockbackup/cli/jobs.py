"""``blockbackup jobs --connect QMP [list|cancel ID|dismiss ID|clean]``: a daemon's jobs.

``cancel`` and ``dismiss`` are QMP's verbs, plus the clean-up a ``backup`` run would have
done: when the job belongs to a ``backup`` run that is gone, its target node and partial
file go too (a live run does that itself). ``clean`` does it for every run that is gone and
dismisses every job that has ended, so that a daemon needs no hand-written QMP after a
killed client.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from blockbackup.cli import repo_live, runs
from blockbackup.cli.qmpclient import (
    CliError,
    Monitor,
    StopSignals,
    UsageError,
    add_connect_argument,
    run_command,
)
from blockbackup.cli.sizes import format_size

ACTIONS = ("list", "cancel", "dismiss", "clean")


def add_parser(sub: Any) -> None:
    jobs = sub.add_parser(
        "jobs",
        help="list, cancel, dismiss or clean up the jobs of a running daemon",
        description="The jobs of a running daemon. list (default): every job. cancel ID: "
        "cancel a job and wait until it ended. dismiss ID: forget an ended job. clean: "
        "dismiss every ended job, and undo what `blockbackup backup` runs that died left "
        "(their jobs, target nodes and partial files).",
    )
    add_connect_argument(jobs)
    jobs.add_argument("action", nargs="?", choices=ACTIONS, default="list")
    jobs.add_argument("id", nargs="?", metavar="ID", help="the job (cancel, dismiss)")
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    async def body(stop: StopSignals) -> int:
        monitor = Monitor(args.connect, args.timeout, stop)
        if args.action in ("cancel", "dismiss") and args.id is None:
            raise UsageError(f"jobs {args.action} needs the job's ID")
        if args.action in ("list", "clean") and args.id is not None:
            raise UsageError(f"jobs {args.action} takes no ID")
        if args.action == "list":
            return await list_jobs(monitor, as_json=args.json)
        if args.action == "clean":
            return await clean(monitor, as_json=args.json)
        return await end_job(monitor, args.id, args.action, as_json=args.json)

    return run_command("jobs", body, verbose=args.verbose)


async def list_jobs(monitor: Monitor, *, as_json: bool) -> int:
    jobs = await monitor.execute("query-jobs")
    if as_json:
        print(json.dumps(jobs))
        return 0
    if not jobs:
        print("no jobs")
        return 0
    table = Table("id", "type", "status", "progress", "error")
    for job in jobs:
        total = job.get("total-progress") or 0
        current = job.get("current-progress") or 0
        done = f"{100 * current / total:.1f}% of {format_size(total)}" if total else "-"
        table.add_row(job["id"], job["type"], job["status"], done, job.get("error", ""))
    Console().print(table)
    return 0


async def end_job(monitor: Monitor, job_id: str, verb: str, *, as_json: bool) -> int:
    """``cancel``/``dismiss`` one job; a dead ``backup`` run's node and file go with it.

    A job of a live ``backup`` run is left for that run to dismiss (it reports the outcome
    and removes its node and file); any other job stays ``concluded`` after a cancel, for
    its owner to read, until ``jobs dismiss``.
    """
    info = await runs.job_info(monitor, job_id)
    if info is None:
        raise CliError(f"Job ID '{job_id}' not found")
    leftover = await _leftover_of(monitor, job_id)
    if verb == "cancel":
        if info["status"] != "concluded":
            await monitor.execute("job-cancel", {"id": job_id})
        info = await runs.wait_concluded(monitor, job_id) or info
    else:
        await monitor.execute("job-dismiss", {"id": job_id})
        if leftover is not None:
            leftover.jobs.clear()
    if leftover is not None and not leftover.tag.owner_alive():
        problems = await runs.clean_leftover(monitor, leftover)
        if problems:
            raise CliError("; ".join(problems))
    if as_json:
        print(json.dumps({"id": job_id, "status": info.get("status"), "error": info.get("error")}))
    elif verb == "cancel":
        print(f"cancelled job {job_id}")
    else:
        print(f"dismissed job {job_id}")
    return 0


async def _leftover_of(monitor: Monitor, job_id: str) -> runs.Leftover | None:
    """The ``backup`` run (live or dead) that ``job_id`` belongs to, if any."""
    for leftover in await runs.find_leftovers(monitor, dead_only=False):
        if any(j["id"] == job_id for j in leftover.jobs):
            return leftover
    return None


async def clean(monitor: Monitor, *, as_json: bool) -> int:
    """Undo every dead run's leftovers, then dismiss every job that ended."""
    cleaned: list[str] = []
    problems: list[str] = []
    for leftover in await runs.find_leftovers(monitor):
        trouble = await runs.clean_leftover(monitor, leftover)
        what = leftover.describe()
        if trouble:
            problems.extend(trouble)
        else:
            cleaned.append(what)
    repo_cleaned, repo_problems = await repo_live.clean_repo_leftovers(monitor)
    cleaned.extend(repo_cleaned)
    problems.extend(repo_problems)
    live = {
        str(j["id"]) for lo in await runs.find_leftovers(monitor, dead_only=False) for j in lo.jobs
    }
    for job in await monitor.execute("query-jobs"):
        if repo_live.live_run_job(str(job["id"])):  # a repository run waiting to commit
            continue
        if job["status"] == "concluded" and job["id"] not in live:
            await monitor.execute("job-dismiss", {"id": job["id"]})
            cleaned.append(f"job {job['id']} (concluded)")
    if as_json:
        print(json.dumps({"cleaned": cleaned, "problems": problems}))
    elif cleaned:
        for what in cleaned:
            print(f"cleaned: {what}")
    else:
        print("nothing to clean")
    if problems:
        raise CliError("could not clean: " + "; ".join(problems))
    return 0
