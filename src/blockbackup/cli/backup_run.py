"""One ``blockbackup backup`` run: the steps that make a backup, and their undoing.

One run, step by step (each step is undone, in reverse, if a later one fails or a signal
comes: nothing is left behind but the backup, or nothing at all):

1. the options are checked before connecting: options that cannot work, or would do
   nothing, are refused as such;
2. the daemon's nodes give the source's size, the files the daemon has open (none of them
   may be the target) and the bitmaps; leftovers of earlier runs that died are cleaned;
3. a new *partial* file is created next to the target, and a target node over it, named
   after this run (:mod:`blockbackup.cli.runs`);
4. one transaction starts the job and the bitmap that ``--start-bitmap`` names: one point
   in time for both;
5. the job is followed to ``pending`` (auto-finalize is off): its data is all in the file
   and flushed;
6. the file is fsynced, renamed to its final name and the directory fsynced; only then is
   the job finalized, which is when a bitmap forgets what this backup copied. A run killed
   before the rename leaves the bitmap holding every change; a run killed after it leaves
   a complete backup. The job is dismissed and the target node deleted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError

from blockbackup.cli import runs, stale
from blockbackup.cli.exitcodes import EXIT_FAILED
from blockbackup.cli.progress import BackupProgress, Output
from blockbackup.cli.qmpclient import (
    CliError,
    DaemonGone,
    Monitor,
    Stopped,
    StopSignals,
    UsageError,
)
from blockbackup.cli.runs import RunTag
from blockbackup.cli.targets import (
    OpenImage,
    allocated,
    check_backing,
    check_target,
    commit,
    create_partial,
)

#: Seconds between two looks at the job.
POLL = 0.2


@dataclass(frozen=True)
class BackupRequest:
    """What ``blockbackup backup`` was asked for."""

    node: str
    target: str
    fmt: str = "raw"
    sync: str = "full"
    speed: int = 0
    force: bool = False
    job_id: str | None = None  # None: the run's own tag
    backing: str | None = None  # qcow2 targets of incrementals: the previous backup
    incremental: str | None = None  # a bitmap: back up only what it marks
    start_bitmap: str | None = None  # (re)start this bitmap at the backup's point in time
    persistent: bool | None = None  # None: persistent where the node can store bitmaps

    def check(self) -> None:
        """Refuse options that cannot work together or would do nothing."""
        if self.sync == "none":
            raise UsageError(
                "--sync none copies nothing by itself (only what is overwritten while the "
                "job runs, for an NBD reader of the point-in-time view): it never finishes "
                "as a backup. Use --sync full, or --incremental for only what changed"
            )
        if self.backing is not None and self.fmt != "qcow2":
            raise UsageError("--backing needs --format qcow2: a raw file has no backing file")
        if self.backing is not None and self.incremental is None:
            raise UsageError(
                "--backing only makes sense with --incremental: a full backup writes every "
                "cluster itself"
            )
        if self.incremental is not None and self.backing is None:
            raise UsageError(
                "--incremental needs --format qcow2 --backing PREVIOUS_BACKUP: on its own, "
                "the target would read as zeroes wherever nothing changed"
            )
        if self.incremental is not None and self.start_bitmap is not None:
            raise UsageError(
                "--incremental BITMAP already restarts BITMAP at this backup's point in "
                "time; --start-bitmap is for full backups"
            )
        if self.persistent is not None and self.start_bitmap is None:
            flag = "--persistent" if self.persistent else "--no-persistent"
            raise UsageError(f"{flag} only applies to the bitmap --start-bitmap creates")


@dataclass
class _Run:
    """What one run made in the daemon and on disk, so that it can be undone."""

    monitor: Monitor
    tag: RunTag
    job_id: str
    partial: Path | None = None
    node_added: bool = False
    job_started: bool = False
    job_settled: bool = False
    bitmap_added: str | None = None  # a bitmap this run created (removed if it fails)
    committed: bool = False
    bitmap_node: str = ""
    daemon_gone: bool = False  # nothing is left in a daemon that went away
    connected: bool = False  # the daemon answered once
    problems: list[str] = field(default_factory=list)

    async def undo(self) -> None:
        """Take back what this run made and has not taken back yet (never interrupted:
        signals only set a flag)."""
        self.monitor = replace(self.monitor, stop=None)  # undoing is never interrupted
        if self.job_started and not self.job_settled:
            await self._step("the job", self._settle_job())
        had_bitmap = self.bitmap_added is not None
        if self.bitmap_added is not None:
            args = {"node": self.bitmap_node, "name": self.bitmap_added}
            if await self._step(
                f"bitmap {self.bitmap_added}",
                self.monitor.execute("block-dirty-bitmap-remove", args),
            ):
                self.bitmap_added = None
        # no bitmap of this run is left to undo; but one in a daemon that went away may
        # come back with it (persistent): then the record lets a later run remove it
        kept_by_gone_daemon = had_bitmap and self.daemon_gone
        if self.partial is not None and self.bitmap_added is None and not kept_by_gone_daemon:
            stale.remove_record(self.partial)
        if self.node_added and await self._step(
            f"node {self.tag.target_node}",
            self.monitor.execute("blockdev-del", {"node-name": self.tag.target_node}),
        ):
            self.node_added = False
        if self.partial is not None and not self.committed:
            try:
                self.partial.unlink(missing_ok=True)
            except OSError as err:
                self.problems.append(f"file {self.partial}: {err.strerror}")

    async def _settle_job(self) -> None:
        info = await runs.job_info(self.monitor, self.job_id)
        if info is not None:
            await runs.settle_job(self.monitor, info)
        self.job_settled = True

    async def _step(self, what: str, aw: Coroutine[Any, Any, Any]) -> bool:
        return await runs.undo_step(self, what, aw)


async def backup(monitor: Monitor, req: BackupRequest, stop: StopSignals, out: Output) -> int:
    """Run one backup (see the module docstring); the exit code.

    Whatever ends it, what it made is undone first; then the outcome is reported: the
    summary, ``cancelled`` (exit 128 + the signal), ``backup failed`` (exit 1), or the
    error that stopped it (one line; with ``--json`` also a ``failed`` result).
    """
    tag = RunTag.new()
    run = _Run(monitor, tag, req.job_id or tag.name, bitmap_node=req.node)
    result: dict[str, Any] = {
        "job-id": run.job_id,
        "node": req.node,
        "target": os.path.abspath(req.target),
        "format": req.fmt,
        "disk-size": None,
    }
    started = time.monotonic()
    try:
        info = await _make_backup(run, req, stop, out, result)
    except Stopped as stopped:
        await run.undo()
        result.update(status="cancelled", error=str(stopped))
        return _finish(out, result, run=run, started=started, code=stopped.exit_code)
    except _JobFailed as failed:
        await run.undo()
        result.update(status="failed", error=str(failed))
        return _finish(out, result, run=run, started=started, code=EXIT_FAILED)
    except DaemonGone as gone:
        run.daemon_gone = True
        await run.undo()
        error = gone
        if run.connected:  # it was there: say that it went away (reported once, by the caller)
            error = DaemonGone(f"lost the connection to the daemon at {monitor.socket}")
        _report_failure(out, result, run, started, str(error))
        raise error from None
    except (CliError, ExecuteError) as err:
        await run.undo()
        _report_failure(out, result, run, started, str(err))
        raise
    except BaseException:
        await run.undo()
        raise
    result.update(
        status="completed",
        error=None,
        len=info.get("total-progress"),
        offset=info.get("current-progress"),
        written=allocated(Path(result["target"])),
    )
    return _finish(out, result, run=run, started=started, code=0)


async def _make_backup(
    run: _Run, req: BackupRequest, stop: StopSignals, out: Output, result: dict[str, Any]
) -> dict[str, Any]:
    """The steps (see the module docstring); the job's last entry once it concluded."""
    monitor = run.monitor
    await runs.clean_dead_runs(monitor, out.note)
    nodes = await monitor.execute("query-named-block-nodes")
    run.connected = True
    source = _find_node(nodes, req.node)
    size = int(source["image"]["virtual-size"])
    result["disk-size"] = size
    open_images = [OpenImage(str(n["node-name"]), str(n["file"])) for n in nodes if n.get("file")]
    final = check_target(req.target, force=req.force, open_images=open_images, source=req.node)
    await stale.clean_dead_files(monitor, final, out.note)
    backing = check_backing(req.backing, final) if req.backing else None
    start_bitmap_exists = _check_start_bitmap(source, req)
    stop.check()
    run.partial = create_partial(final, run.tag, size=size, fmt=req.fmt, backing=backing)
    stop.check()
    await _add_target_node(run, req.fmt)
    stop.check()
    await _start_job(run, req, start_bitmap_exists, out)
    info = await _follow(run, req, stop, out)
    if info["status"] == "pending":
        stop.check()  # the last moment a signal still cancels the backup
        commit(run.partial, final, replace=req.force)
        run.committed = True
        await monitor.execute("job-finalize", {"id": run.job_id})
        info = await runs.wait_concluded(monitor, run.job_id) or info
    error = info.get("error")
    if error is not None:
        if run.committed:  # it failed after its data was in: do not keep a doubtful file
            final.unlink(missing_ok=True)
        raise _JobFailed(str(error))
    await monitor.execute("job-dismiss", {"id": run.job_id})
    run.job_settled = True
    run.bitmap_added = None  # it is the bitmap the user asked for now
    await run.undo()  # the target node; the file is committed
    return info


def _report_failure(
    out: Output, result: dict[str, Any], run: _Run, started: float, error: str
) -> None:
    """With ``--json``, a ``failed`` result for an error the caller reports as a line."""
    if out.as_json:
        result.update(status="failed", error=error)
        result.setdefault("len", None)
        result.setdefault("offset", None)
        result.setdefault("written", 0)
        result["seconds"] = round(time.monotonic() - started, 3)
        out.emit_json(result)
    _report_problems(out, run)


class _JobFailed(Exception):
    """The job concluded with an error (its text)."""


def _finish(
    out: Output,
    result: dict[str, Any],
    *,
    run: _Run,
    started: float,
    code: int,
) -> int:
    result.setdefault("len", None)
    result.setdefault("offset", None)
    result.setdefault("written", 0)
    result["seconds"] = round(time.monotonic() - started, 3)
    out.result(result, result["node"], str(Path(result["target"]).name))
    _report_problems(out, run)
    return code


def _report_problems(out: Output, run: _Run) -> None:
    if run.problems:
        out.note(
            "could not clean up everything: "
            + "; ".join(run.problems)
            + " (`blockbackup jobs --connect QMP clean` retries)"
        )


def _find_node(nodes: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for node in nodes:
        if node.get("node-name") == name:
            return node
    raise CliError(
        f"Cannot find device='{name}' nor node-name='{name}' "
        "(`blockbackup bitmaps --connect QMP list` or query-named-block-nodes list the nodes)"
    )


def _check_start_bitmap(source: dict[str, Any], req: BackupRequest) -> bool:
    """Whether the --start-bitmap bitmap exists already (and fits the persistence asked)."""
    if req.start_bitmap is None:
        return False
    existing = next(
        (b for b in source.get("dirty-bitmaps", []) if b.get("name") == req.start_bitmap), None
    )
    if existing is None:
        return False
    if req.persistent is not None and bool(existing.get("persistent")) != req.persistent:
        kind = "persistent" if existing.get("persistent") else "not persistent"
        raise UsageError(
            f"bitmap '{req.start_bitmap}' exists and is {kind}: remove it first "
            "(`blockbackup bitmaps remove`) to create it anew"
        )
    return True


async def _add_target_node(run: _Run, fmt: str) -> None:
    assert run.partial is not None
    options = {
        "driver": fmt,
        "node-name": run.tag.target_node,
        "file": {"driver": "file", "filename": str(run.partial)},
    }
    try:
        await run.monitor.execute("blockdev-add", options)
    except ExecuteError as err:
        raise CliError(f"the daemon cannot open the new target file: {err}") from None
    run.node_added = True


def _actions(
    req: BackupRequest, run: _Run, *, add_bitmap: bool, persistent: bool
) -> list[dict[str, Any]]:
    """The transaction: the job, and the bitmap it starts, at one point in time.

    ``--start-bitmap`` is the job's bitmap with ``bitmap-mode=on-success`` on a full copy:
    if the backup succeeds, the bitmap keeps only the writes made since its point in time
    (it restarts there); if it fails, the bitmap keeps everything it had, plus those writes.
    """
    backup: dict[str, Any] = {
        "job-id": run.job_id,
        "device": req.node,
        "target": run.tag.target_node,
        "sync": req.sync,
        "speed": req.speed,
        "auto-finalize": False,  # the file gets its name before the bitmap is applied
        "auto-dismiss": False,  # so that the outcome can be read after it happened
    }
    actions: list[dict[str, Any]] = []
    if req.incremental:
        backup.update(sync="incremental", bitmap=req.incremental)
    elif req.start_bitmap:
        backup.update(bitmap=req.start_bitmap, **{"bitmap-mode": "on-success"})
        if add_bitmap:
            add = {"node": req.node, "name": req.start_bitmap, "persistent": persistent}
            actions.append({"type": "block-dirty-bitmap-add", "data": add})
    actions.append({"type": "blockdev-backup", "data": backup})
    return actions


async def _start_job(run: _Run, req: BackupRequest, bitmap_exists: bool, out: Output) -> None:
    add_bitmap = req.start_bitmap is not None and not bitmap_exists
    persistent = req.persistent is not False
    if add_bitmap:
        assert run.partial is not None
        assert req.start_bitmap is not None
        stale.write_record(run.partial, req.node, req.start_bitmap)  # before it exists
    try:
        await _transaction(run, req, add_bitmap=add_bitmap, persistent=persistent)
    except ExecuteError as err:
        cannot_store = "Can't store persistent bitmaps" in str(err)
        if not (add_bitmap and persistent and cannot_store and req.persistent is None):
            raise _explain_start_error(err, run) from None
        out.note(
            f"warning: {err}; bitmap '{req.start_bitmap}' is kept in memory only and will "
            "not survive a restart of the daemon"
        )
        await _transaction(run, req, add_bitmap=True, persistent=False)
    if add_bitmap:
        run.bitmap_added = req.start_bitmap


async def _transaction(
    run: _Run, req: BackupRequest, *, add_bitmap: bool, persistent: bool
) -> None:
    actions = _actions(req, run, add_bitmap=add_bitmap, persistent=persistent)
    await run.monitor.execute("transaction", {"actions": actions})
    run.job_started = True


def _explain_start_error(err: ExecuteError, run: _Run) -> CliError:
    text = str(err)
    if "already in use" in text and run.job_id in text:
        text += (
            " (`blockbackup jobs --connect QMP` lists the jobs; `jobs clean` removes ended ones)"
        )
    return CliError(text)


async def _follow(run: _Run, req: BackupRequest, stop: StopSignals, out: Output) -> dict[str, Any]:
    """Poll the job until it is pending (data complete) or concluded; its last entry."""
    assert run.partial is not None
    with BackupProgress(f"backup {req.node}", out.console, show=not out.as_json) as bar:
        while True:
            info = await runs.job_info(run.monitor, run.job_id)
            if info is None:
                run.job_settled = True
                raise CliError(f"job {run.job_id} disappeared (another client dismissed it)")
            bar.update(
                int(info.get("current-progress") or 0),
                int(info.get("total-progress") or 0),
                allocated(run.partial),
            )
            if info["status"] in ("pending", "concluded"):
                return info
            await stop.wait(POLL)
