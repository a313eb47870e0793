"""``blockbackup backup --connect QMP NODE TARGET``: a live backup of a served node to a file."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from qemu.qmp import ExecuteError
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from blockbackup.cli.qmpclient import (
    EXIT_FAILED,
    ExecuteErrorLike,
    qmp,
    run_interruptible,
    suppress_execute_error,
)
from blockbackup.cli.sizes import parse_size


def add_parser(sub: Any) -> None:
    backup = sub.add_parser("backup", help="back up a node of a running daemon to a file")
    backup.add_argument("--connect", required=True, metavar="QMP_SOCKET")
    backup.add_argument("node", metavar="NODE")
    backup.add_argument("target", metavar="TARGET_FILE")
    backup.add_argument("--speed", type=parse_size, default=0, help="bytes/s (default: no limit)")
    backup.add_argument("--sync", choices=("full", "top", "none"), default="full")
    backup.add_argument("--job-id", default="backup0")
    backup.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="target format")
    backup.add_argument("--backing", metavar="FILE", help="qcow2 target: the previous backup")
    backup.add_argument("--incremental", metavar="BITMAP", help="copy only what BITMAP marks")
    backup.add_argument(
        "--start-bitmap", metavar="BITMAP", help="start BITMAP at this backup's point in time"
    )
    backup.add_argument("--persistent", action="store_true", help="with --start-bitmap")
    backup.add_argument("--json", action="store_true", help="print the result as JSON")
    backup.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    request = BackupRequest(
        node=args.node,
        target_file=args.target,
        speed=args.speed,
        sync=args.sync,
        job_id=args.job_id,
        target_format=args.format,
        backing=args.backing,
        incremental=args.incremental,
        start_bitmap=args.start_bitmap,
        persistent=args.persistent,
    )
    return run_interruptible(backup_command(args.connect, request, as_json=args.json))


async def _job_info(socket: str, job_id: str) -> dict[str, Any] | None:
    (jobs,) = await qmp(socket, ("query-jobs", None))
    return next((dict(j) for j in jobs if j.get("id") == job_id), None)


@dataclass(frozen=True)
class BackupRequest:
    """What ``blockbackup backup`` was asked for."""

    node: str
    target_file: str
    speed: int = 0
    sync: str = "full"
    job_id: str = "backup0"
    target_format: str = "raw"
    backing: str | None = None  # qcow2 targets: the previous backup in the chain
    incremental: str | None = None  # a bitmap: back up only what it marks
    start_bitmap: str | None = None  # create this bitmap at the backup's point in time
    persistent: bool = False


def _create_target(req: BackupRequest, size: int) -> None:
    if os.path.exists(req.target_file):
        return
    if req.target_format == "qcow2":
        from blockbackup.block.qcow2.create import create_qcow2_file  # lazy: start-up cost

        backing = os.path.abspath(req.backing) if req.backing else None
        create_qcow2_file(
            req.target_file, size, backing_file=backing, backing_fmt="qcow2" if backing else None
        )
    else:
        with open(req.target_file, "wb") as f:
            f.truncate(size)


def _backup_actions(req: BackupRequest, target_node: str) -> list[dict[str, Any]]:
    """The transaction that starts the backup (and its bitmap, at the same point in time)."""
    backup: dict[str, Any] = {
        "job-id": req.job_id,
        "device": req.node,
        "target": target_node,
        "sync": "incremental" if req.incremental else req.sync,
        "speed": req.speed,
        "auto-dismiss": False,  # so that the outcome can be read after it happened
    }
    if req.incremental:
        backup["bitmap"] = req.incremental
    actions: list[dict[str, Any]] = []
    if req.start_bitmap:
        add = {"node": req.node, "name": req.start_bitmap, "persistent": req.persistent}
        actions.append({"type": "block-dirty-bitmap-add", "data": add})
    actions.append({"type": "blockdev-backup", "data": backup})
    return actions


async def _run_backup(socket: str, req: BackupRequest, *, as_json: bool, console: Console) -> int:
    node, target_file, job_id = req.node, req.target_file, req.job_id
    (nodes,) = await qmp(socket, ("query-named-block-nodes", None))
    sizes = {n.get("node-name"): n["image"]["virtual-size"] for n in nodes}
    if node not in sizes:
        raise ExecuteErrorLike(f"Cannot find device='{node}' nor node-name='{node}'")
    _create_target(req, int(sizes[node]))
    target_node = f"{job_id}-target"
    target = {"driver": "file", "filename": os.path.abspath(target_file)}
    await qmp(
        socket,
        ("blockdev-add", {"driver": req.target_format, "node-name": target_node, "file": target}),
    )
    started = time.monotonic()
    try:
        await qmp(socket, ("transaction", {"actions": _backup_actions(req, target_node)}))
        try:
            info = await _follow(socket, job_id, console, show=not as_json)
        except asyncio.CancelledError:
            await _cancel(socket, job_id)
            raise
    finally:
        await asyncio.shield(_remove_node(socket, target_node))
    seconds = time.monotonic() - started
    result = {
        "job-id": job_id,
        "status": "completed" if info.get("error") is None else "failed",
        "len": info.get("total-progress"),
        "offset": info.get("current-progress"),
        "seconds": round(seconds, 3),
        "error": info.get("error"),
        "target": os.path.abspath(target_file),
    }
    if as_json:
        print(json.dumps(result))
    elif result["error"]:
        console.print(f"[red]backup failed:[/red] {result['error']}")
    else:
        rate = int(info.get("total-progress") or 0) / max(seconds, 1e-9) / (1 << 20)
        console.print(f"backup of {node} done: {target_file} ({rate:.0f} MiB/s, {seconds:.1f} s)")
    return 0 if result["error"] is None else EXIT_FAILED


async def _follow(socket: str, job_id: str, console: Console, *, show: bool) -> dict[str, Any]:
    """Poll the job until it concluded; dismiss it; its last query-jobs entry."""
    columns = (
        TextColumn(f"backup {job_id}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show) as progress:
        task = progress.add_task("backup", total=None)
        while True:
            info = await _job_info(socket, job_id)
            if info is None:
                raise ExecuteErrorLike(f"job {job_id} disappeared")
            progress.update(task, completed=info["current-progress"], total=info["total-progress"])
            if info["status"] == "concluded":
                await qmp(socket, ("job-dismiss", {"id": job_id}))
                return info
            await asyncio.sleep(0.2)


async def _cancel(socket: str, job_id: str) -> None:
    async def cancel() -> None:
        with suppress_execute_error():
            await qmp(socket, ("job-cancel", {"id": job_id}))
        while (info := await _job_info(socket, job_id)) is not None:
            if info["status"] == "concluded":
                await qmp(socket, ("job-dismiss", {"id": job_id}))
                return
            await asyncio.sleep(0.05)

    await asyncio.shield(cancel())


async def _remove_node(socket: str, node: str) -> None:
    with suppress_execute_error():
        await qmp(socket, ("blockdev-del", {"node-name": node}))


class _suppress_execute_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ExecuteError | ConnectionError | EOFError)


async def backup_command(socket: str, req: BackupRequest, *, as_json: bool) -> int:
    console = Console(stderr=as_json)
    try:
        await qmp(socket)  # fail early, with a clear text, if nobody listens there
    except Exception as exc:  # the connect error text is what the user needs
        print(f"blockbackup backup: cannot connect to {socket}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return await _run_backup(socket, req, as_json=as_json, console=console)
    except (ExecuteError, ExecuteErrorLike) as exc:
        print(f"blockbackup backup: {exc}", file=sys.stderr)
        return EXIT_FAILED
