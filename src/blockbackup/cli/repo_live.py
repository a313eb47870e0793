"""``blockbackup backup --connect Q DISK... --repo R``: live disks into one repository snapshot.

The same live backup job as a backup to a file (point in time, copy-before-write, guests
first), with a ``bb-repo-target`` node as each disk's target, all started in one
``transaction`` (one T0 for every disk); once every job concluded, ``x-bb-repo-commit``
makes the daemon commit one manifest for all of them. A run that fails, is cancelled or
is killed commits nothing (its stored chunks are reused by the next run).

Incrementals use *checkpoints*: a dirty bitmap named ``NAME@TOKEN`` (TOKEN random), created
in the same transaction as the snapshot that records it in its disk's ``source``
(``{"bitmap": NAME, "checkpoint": "NAME@TOKEN"}``). The bitmap therefore holds every write
since that snapshot's T0, and nothing else can have the same name: a bitmap removed,
re-created, left by a run that never committed, or a snapshot pruned all break the match.
``--incremental NAME`` reads only what the checkpoint marks, into a target that starts from
that snapshot's disk index, when the latest snapshot of the disk names a checkpoint that
exists on the node, is recording, consistent and not busy, and the disk's size is the
same; otherwise it reads the whole disk and says why (one line). Either way it starts the
next checkpoint. The old checkpoint is read with ``bitmap-mode=never``, so a failed run
leaves it as it was, and it is removed only after the new snapshot is committed.

Each run names what it makes after its tag (:class:`~blockbackup.cli.runs.RunTag`):
``TAG-repoN`` nodes, ``TAG-jN`` jobs and the ``TAG-key`` secret, so the next run finds and
removes what a killed one left.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from qemu.qmp import ExecuteError

from blockbackup.cli import runs
from blockbackup.cli.exitcodes import EXIT_FAILED
from blockbackup.cli.progress import BackupProgress, Output
from blockbackup.cli.qmpclient import CliError, DaemonGone, Monitor, Stopped, StopSignals
from blockbackup.cli.runs import RunTag
from blockbackup.cli.sizes import format_rate, format_size

#: Seconds between two looks at the jobs.
POLL = 0.2
#: Parallel chunks per job: the repository node serialises entering chunks, so more
#: workers would only hold more buffers.
MAX_WORKERS = 8
_LEFTOVER = re.compile(r"^(?P<tag>bb-[0-9]+-[0-9a-f]{6})-(?:repo|j)[0-9]+$")
_CHECKPOINT = re.compile(r"^(?P<name>.+)@(?P<token>[0-9a-f]{16})$")


@dataclass(frozen=True)
class LiveRequest:
    """What ``backup --connect Q DISK... --repo R`` was asked for."""

    nodes: tuple[str, ...]
    names: tuple[str, ...]  # the disk names in the repository, one per node
    repo: str
    secret: bytes | None
    incremental: str | None = None
    start_bitmap: str | None = None
    persistent: bool | None = None
    speed: int = 0
    #: where an s3:// repository is (endpoint, region...): node options, never credentials
    storage: dict[str, str] = field(default_factory=dict)


@dataclass
class DiskPlan:
    """How one disk is backed up."""

    node: str
    name: str
    size: int
    target: str
    job: str
    base: str  # the snapshot id the target starts from, or "none"
    bitmap: str | None = None  # the series name (--incremental / --start-bitmap)
    read_from: str | None = None  # the checkpoint read (an incremental), else a full read
    checkpoint: str | None = None  # the checkpoint this run starts
    fallback: str | None = None  # why an incremental reads the whole disk

    @property
    def mode(self) -> str:
        return "incremental" if self.read_from else "full"

    def source(self) -> dict[str, str]:
        """What the manifest's disk ``source`` records besides its base."""
        out = {"node": self.node, "mode": self.mode}
        if self.bitmap is not None and self.checkpoint is not None:
            out.update(bitmap=self.bitmap, checkpoint=self.checkpoint)
        if self.read_from is not None:
            out["read-from"] = self.read_from
        return out


def location(repo: str) -> str:
    """The repository as the daemon must name it: a path made absolute (the daemon may run
    elsewhere in the file system), a URL (an object store) as it is."""
    return repo if "://" in repo else os.path.abspath(repo)


def new_checkpoint(name: str) -> str:
    return f"{name}@{secrets.token_hex(8)}"


def checkpoints_of(node: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The checkpoint bitmaps of series ``name`` on a ``query-named-block-nodes`` entry."""
    out = {}
    for bitmap in node.get("dirty-bitmaps", []):
        m = _CHECKPOINT.match(str(bitmap.get("name", "")))
        if m and m["name"] == name:
            out[str(bitmap["name"])] = dict(bitmap)
    return out


def why_not_incremental(
    series: str, disk: str, node: dict[str, Any], size: int, latest: Any | None
) -> str | None:
    """Why the checkpoint of ``series`` cannot be trusted for ``disk`` (None: it can).

    ``latest`` is the newest manifest holding ``disk`` (None: no snapshot of it yet).
    """
    if latest is None:
        return f"no snapshot of {disk} in the repository yet"
    record = latest.disk(disk)
    recorded = record.source.get("checkpoint")
    if record.source.get("bitmap") != series or not isinstance(recorded, str):
        return f"the latest snapshot of {disk} ({latest.id}) did not start bitmap {series}"
    found = checkpoints_of(node, series).get(recorded)
    if found is None:
        return f"bitmap {series} is missing on {node['node-name']}"
    if found.get("inconsistent"):
        return f"bitmap {series} on {node['node-name']} is inconsistent"
    if found.get("busy"):
        return f"bitmap {series} on {node['node-name']} is in use"
    if not found.get("recording", True):
        return f"bitmap {series} on {node['node-name']} is disabled"
    if record.size != size:
        return (
            f"{node['node-name']} is {format_size(size)} now, {format_size(record.size)} in "
            f"the latest snapshot of {disk}"
        )
    return None


@dataclass
class _Run:
    """What one run made in the daemon, so that it can be undone."""

    monitor: Monitor
    tag: RunTag
    plans: list[DiskPlan] = field(default_factory=list)
    secret_added: bool = False
    nodes_added: list[str] = field(default_factory=list)
    jobs_started: list[str] = field(default_factory=list)
    checkpoints_added: list[tuple[str, str]] = field(default_factory=list)  # (node, bitmap)
    committed: bool = False
    daemon_gone: bool = False
    connected: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def secret_id(self) -> str:
        return f"{self.tag.name}-key"

    async def undo(self) -> None:
        """Take back what this run made (never interrupted: signals only set a flag)."""
        self.monitor = replace(self.monitor, stop=None)
        for job in list(self.jobs_started):
            if await self._step(f"job {job}", _settle(self.monitor, job)):
                self.jobs_started.remove(job)
        if not self.committed:
            for node, bitmap in list(self.checkpoints_added):
                args = {"node": node, "name": bitmap}
                if await self._step(
                    f"bitmap {bitmap}", self.monitor.execute("block-dirty-bitmap-remove", args)
                ):
                    self.checkpoints_added.remove((node, bitmap))
        for node in list(self.nodes_added):
            args = {"node-name": node}
            if await self._step(f"node {node}", self.monitor.execute("blockdev-del", args)):
                self.nodes_added.remove(node)
        if self.secret_added and await self._step(
            f"object {self.secret_id}", self.monitor.execute("object-del", {"id": self.secret_id})
        ):
            self.secret_added = False

    async def _step(self, what: str, aw: Coroutine[Any, Any, Any]) -> bool:
        return await runs.undo_step(self, what, aw)


async def _settle(monitor: Monitor, job_id: str) -> None:
    info = await runs.job_info(monitor, job_id)
    if info is not None:
        await runs.settle_job(monitor, info)


class _Failed(Exception):
    """A job concluded with an error (its text)."""


async def backup_live(monitor: Monitor, req: LiveRequest, stop: StopSignals, out: Output) -> int:
    """One run (see the module docstring); the exit code."""
    run = _Run(monitor, RunTag.new())
    result: dict[str, Any] = {
        "repository": location(req.repo),
        "snapshot": None,
        "disks": [],
    }
    started = time.monotonic()
    try:
        await _make(run, req, stop, out, result)
    except Stopped as stopped:
        await run.undo()
        result.update(status="cancelled", error=str(stopped))
        _finish(out, run, result, started)
        return stopped.exit_code
    except _Failed as failed:
        await run.undo()
        result.update(status="failed", error=str(failed))
        _finish(out, run, result, started)
        return EXIT_FAILED
    except DaemonGone as gone:
        run.daemon_gone = True
        await run.undo()
        error = gone
        if run.connected:
            error = DaemonGone(f"lost the connection to the daemon at {monitor.socket}")
        _fail_json(out, run, result, started, str(error))
        raise error from None
    except (CliError, ExecuteError) as err:
        await run.undo()
        _fail_json(out, run, result, started, str(err))
        raise
    except BaseException:
        await run.undo()
        raise
    result.update(status="completed", error=None)
    _finish(out, run, result, started)
    return 0


async def _make(
    run: _Run, req: LiveRequest, stop: StopSignals, out: Output, result: dict[str, Any]
) -> None:
    monitor = run.monitor
    await runs.clean_dead_runs(monitor, out.note)
    await clean_dead_repo_runs(monitor, out.note)
    nodes = {str(n["node-name"]): n for n in await monitor.execute("query-named-block-nodes")}
    run.connected = True
    for name in req.nodes:
        if name not in nodes:
            raise CliError(
                f"Cannot find device='{name}' nor node-name='{name}' "
                "(`blockbackup bitmaps --connect QMP list` or query-named-block-nodes list them)"
            )
    run.plans = _plan(run, req, nodes, out)
    result["disks"] = [_disk_result(p) for p in run.plans]
    stop.check()
    await _add_targets(run, req)
    stop.check()
    await _start(run, req, out)
    infos = await _follow(run, stop, out)
    stop.check()  # the last moment a signal still cancels the backup
    sources = {p.target: p.source() for p in run.plans}
    committed = await monitor.execute(
        "x-bb-repo-commit", {"nodes": [p.target for p in run.plans], "sources": sources}
    )
    run.committed = True
    result["snapshot"] = committed["snapshot"]
    for disk, stats, plan in zip(result["disks"], committed["disks"], run.plans, strict=True):
        info = infos[plan.job]
        disk.update(
            read=int(info.get("total-progress") or 0),
            **{k: stats[k] for k in ("stored-chunks", "stored-bytes", "reused-chunks")},
        )
    await run.undo()  # jobs, nodes, secret: the snapshot is committed
    try:
        await _drop_old_checkpoints(run)
    except (CliError, ExecuteError) as err:  # the snapshot stands; the next run retries
        run.problems.append(f"older checkpoints: {err}")


def _plan(
    run: _Run, req: LiveRequest, nodes: dict[str, dict[str, Any]], out: Output
) -> list[DiskPlan]:
    """Each disk's base, bitmap and checkpoint (reading the repository's catalog)."""
    from blockbackup.repository import catalog  # lazy: start-up cost
    from blockbackup.repository.repo import Repository  # lazy: start-up cost

    try:
        with Repository.open(req.repo, req.secret, req.storage) as repo:
            latest_of = {n: catalog.latest_with_disk(repo.backend, repo.keys, n) for n in req.names}
        plans = []
        for i, (node, name) in enumerate(zip(req.nodes, req.names, strict=True)):
            info = nodes[node]
            size = int(info["image"]["virtual-size"])
            latest = latest_of[name]
            plan = DiskPlan(
                node=node,
                name=name,
                size=size,
                target=f"{run.tag.name}-repo{i}",
                job=f"{run.tag.name}-j{i}",
                base="none" if latest is None else latest.id,
            )
            series = req.incremental or req.start_bitmap
            if series is not None:
                plan.bitmap = series
                plan.checkpoint = new_checkpoint(series)
            if req.incremental is not None:
                reason = why_not_incremental(req.incremental, name, info, size, latest)
                if reason is None:
                    assert latest is not None
                    plan.read_from = str(latest.disk(name).source["checkpoint"])
                else:
                    plan.fallback = reason
                    out.note(f"{reason}: reading the whole disk")
            plans.append(plan)
    except CliError:
        raise
    except Exception as exc:  # the repository's errors: one line, named by the command
        from blockbackup.errors import BlockBackupError  # lazy: start-up cost

        if isinstance(exc, BlockBackupError | OSError):
            raise CliError(str(exc)) from None
        raise
    return plans


def _disk_result(plan: DiskPlan) -> dict[str, Any]:
    return {
        "node": plan.node,
        "disk": plan.name,
        "size": plan.size,
        "mode": plan.mode,
        "base": plan.base,
        "bitmap": plan.bitmap,
        "checkpoint": plan.checkpoint,
        "read-from": plan.read_from,
        "fallback": plan.fallback,
    }


async def _add_targets(run: _Run, req: LiveRequest) -> None:
    """The secret (only while the nodes open: they read it then), then one target per disk."""
    from blockbackup.cli.repo_common import secret_object  # lazy: start-up cost

    key = secret_object(req.secret)
    if key is not None:
        key["id"] = run.secret_id
        await run.monitor.execute("object-add", key)
        run.secret_added = True
    for plan in run.plans:
        options: dict[str, Any] = {
            "driver": "bb-repo-target",
            "node-name": plan.target,
            "repository": location(req.repo),
            "disk": plan.name,
            "size": plan.size,
            "base": plan.base,
            **req.storage,
        }
        if key is not None:
            options["key-secret"] = run.secret_id
        try:
            await run.monitor.execute("blockdev-add", options)
        except ExecuteError as err:
            raise CliError(f"the daemon cannot open the repository: {err}") from None
        run.nodes_added.append(plan.target)
    if run.secret_added:
        await run.monitor.execute("object-del", {"id": run.secret_id})
        run.secret_added = False


def _actions(run: _Run, req: LiveRequest, *, persistent: bool) -> list[dict[str, Any]]:
    actions: list[dict[str, Any]] = []
    for plan in run.plans:
        if plan.checkpoint is not None:
            add = {"node": plan.node, "name": plan.checkpoint, "persistent": persistent}
            actions.append({"type": "block-dirty-bitmap-add", "data": add})
        backup: dict[str, Any] = {
            "job-id": plan.job,
            "device": plan.node,
            "target": plan.target,
            "sync": "full",
            "speed": req.speed,
            "auto-finalize": True,
            "auto-dismiss": False,  # the outcome is read after it happened
            "x-perf": {"max-workers": MAX_WORKERS},
        }
        if plan.read_from is not None:
            # never: the checkpoint stays as it was whatever happens; this run removes it
            # only after its snapshot is committed
            backup.update(sync="bitmap", bitmap=plan.read_from, **{"bitmap-mode": "never"})
        actions.append({"type": "blockdev-backup", "data": backup})
    return actions


async def _start(run: _Run, req: LiveRequest, out: Output) -> None:
    persistent = req.persistent is not False
    try:
        await _transaction(run, req, persistent=persistent)
    except ExecuteError as err:
        cannot_store = "Can't store persistent bitmaps" in str(err)
        if not (persistent and cannot_store and req.persistent is None):
            raise CliError(str(err)) from None
        out.note(
            f"warning: {err}; bitmap {req.incremental or req.start_bitmap} is kept in memory "
            "only and will not survive a restart of the daemon"
        )
        await _transaction(run, req, persistent=False)


async def _transaction(run: _Run, req: LiveRequest, *, persistent: bool) -> None:
    await run.monitor.execute("transaction", {"actions": _actions(run, req, persistent=persistent)})
    run.jobs_started = [p.job for p in run.plans]
    run.checkpoints_added = [(p.node, p.checkpoint) for p in run.plans if p.checkpoint]


async def _follow(run: _Run, stop: StopSignals, out: Output) -> dict[str, dict[str, Any]]:
    """Poll the jobs until all concluded; their last entries. A failed one fails the run."""
    label = "backup " + ", ".join(p.node for p in run.plans)
    wanted = {p.job for p in run.plans}
    with BackupProgress(label, out.console, show=not out.as_json) as bar:
        while True:
            jobs = {
                str(j["id"]): dict(j)
                for j in await run.monitor.execute("query-jobs")
                if j.get("id") in wanted
            }
            missing = wanted - set(jobs)
            if missing:
                raise CliError(
                    f"job {sorted(missing)[0]} disappeared (another client dismissed it)"
                )
            for job in jobs.values():
                if job["status"] == "concluded" and job.get("error"):
                    raise _Failed(f"{job['id']}: {job['error']}")
            current = sum(int(j.get("current-progress") or 0) for j in jobs.values())
            total = sum(int(j.get("total-progress") or 0) for j in jobs.values())
            bar.update(current, total, current)
            if all(j["status"] == "concluded" for j in jobs.values()):
                return jobs
            await stop.wait(POLL)


async def _drop_old_checkpoints(run: _Run) -> None:
    """After the commit: the series' other checkpoints on each node (the one this run read,
    and any a run that never committed left) can no longer serve an incremental."""
    nodes = {str(n["node-name"]): n for n in await run.monitor.execute("query-named-block-nodes")}
    for plan in run.plans:
        if plan.bitmap is None or plan.node not in nodes:
            continue
        for name in checkpoints_of(nodes[plan.node], plan.bitmap):
            if name == plan.checkpoint:
                continue
            try:
                await run.monitor.execute(
                    "block-dirty-bitmap-remove", {"node": plan.node, "name": name}
                )
            except ExecuteError as err:  # busy in another run: the next run tries again
                run.problems.append(f"bitmap {name}: {err}")


def _finish(out: Output, run: _Run, result: dict[str, Any], started: float) -> None:
    result["seconds"] = round(time.monotonic() - started, 3)
    if out.as_json:
        out.emit_json(result)
    status = result["status"]
    if status == "completed":
        if not out.as_json:
            print(summary(result), flush=True)
    elif status == "cancelled":
        out.note(f"cancelled ({result['error']}): no snapshot was committed")
    else:
        out.note(f"backup failed: {result['error']}; no snapshot was committed")
    _report_problems(out, run)


def summary(result: dict[str, Any]) -> str:
    disks = result["disks"]
    read = sum(d.get("read") or 0 for d in disks)
    stored = sum(d.get("stored-bytes") or 0 for d in disks)
    seconds = max(result["seconds"], 1e-9)
    parts = []
    for d in disks:
        how = "incremental" if d["mode"] == "incremental" else "full"
        parts.append(f"{d['disk']} ({format_size(d['size'])}, {how})")
    return (
        f"snapshot {result['snapshot']}: {', '.join(parts)}; {format_size(read)} read in "
        f"{result['seconds']:.1f} s ({format_rate(read / seconds)}), {format_size(stored)} "
        "stored"
    )


def _fail_json(out: Output, run: _Run, result: dict[str, Any], started: float, error: str) -> None:
    if out.as_json:
        result.update(status="failed", error=error, seconds=round(time.monotonic() - started, 3))
        out.emit_json(result)
    _report_problems(out, run)


def _report_problems(out: Output, run: _Run) -> None:
    if run.problems:
        out.note("could not clean up everything: " + "; ".join(run.problems))


def live_run_job(job_id: str) -> bool:
    """Whether ``job_id`` is a job of a repository run whose process still runs."""
    m = _LEFTOVER.match(job_id)
    tag = RunTag.parse(m["tag"]) if m else None
    return tag is not None and tag.owner_alive()


async def clean_dead_repo_runs(monitor: Monitor, say: Callable[[str], None]) -> bool:
    """Undo what killed repository runs left, saying what; False if something remains."""
    cleaned, problems = await clean_repo_leftovers(monitor)
    for what in cleaned:
        say(f"cleaned up after a run that died: {what}")
    for problem in problems:
        say(f"could not clean up after a run that died: {problem}")
    return not problems


async def clean_repo_leftovers(monitor: Monitor) -> tuple[list[str], list[str]]:
    """Undo what killed repository runs left: their jobs, target nodes and secret. (What
    was cleaned, the problems.) Their uncommitted checkpoints go with the next run that
    commits a snapshot of that series."""
    nodes, jobs = await monitor.run(("query-named-block-nodes", None), ("query-jobs", None))
    found: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    for node in nodes:
        m = _LEFTOVER.match(str(node.get("node-name", "")))
        if m:
            found.setdefault(m["tag"], ([], []))[0].append(str(node["node-name"]))
    for job in jobs:
        m = _LEFTOVER.match(str(job.get("id", "")))
        if m:
            found.setdefault(m["tag"], ([], []))[1].append(dict(job))
    cleaned: list[str] = []
    problems: list[str] = []
    for tag_name, (names, tag_jobs) in found.items():
        tag = RunTag.parse(tag_name)
        if tag is None or tag.owner_alive():
            continue
        trouble: list[str] = []
        for job in tag_jobs:
            try:
                await runs.settle_job(monitor, job)
            except (ExecuteError, CliError) as err:
                trouble.append(f"job {job['id']}: {err}")
        for name in names:
            try:
                await monitor.execute("blockdev-del", {"node-name": name})
            except ExecuteError as err:
                trouble.append(f"node {name}: {err}")
        try:
            await monitor.execute("object-del", {"id": f"{tag_name}-key"})
        except ExecuteError:
            pass  # deleted by the run itself once its nodes were open
        what = ", ".join([f"job {j['id']}" for j in tag_jobs] + [f"node {n}" for n in names])
        if trouble:
            problems.append(f"{what}: {'; '.join(trouble)}")
        else:
            cleaned.append(what)
    return cleaned, problems
