"""The user-facing commands: ``serve``, ``backup`` and ``jobs``.

``serve`` is the simple way in: a daemon exporting images over NBD with a QMP monitor, built
from the same options as ``blockbackup daemon`` (so it runs the same handlers). ``backup``
and ``jobs`` are QMP clients (QEMU's own ``qemu.qmp``): they work against blockbackup and
against qemu-storage-daemon alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


# -- serve ----------------------------------------------------------------------------------


def node_names(images: list[str]) -> list[str]:
    """A valid, unique node-name per image, from its file name (``disk-1.img`` -> ``disk-1``)."""
    names: list[str] = []
    for image in images:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(image).stem)[:24] or "disk"
        if not stem[0].isalpha():
            stem = f"disk-{stem}"[:24]
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def serve_options(
    images: list[str], names: list[str], nbd_addr: str, qmp_path: str, read_only: bool
) -> list[str]:
    """The ``blockbackup daemon`` arguments that serve ``images``."""
    argv: list[str] = []
    for image, name in zip(images, names, strict=True):
        node = {
            "driver": "raw",
            "node-name": name,
            "read-only": read_only,
            "file": {"driver": "file", "filename": os.path.abspath(image)},
        }
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--nbd-server", nbd_addr]
    for name in names:
        writable = "off" if read_only else "on"
        argv += ["--export", f"type=nbd,id={name},node-name={name},name={name},writable={writable}"]
    argv += [
        "--chardev",
        f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
        "--monitor",
        "chardev=qmp0",
    ]
    return argv


async def serve(
    images: list[str],
    *,
    listen: str | None,
    directory: str | None,
    read_only: bool,
    as_json: bool,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run a daemon serving ``images`` until SIGINT/SIGTERM or ``quit``."""
    from blockbackup.daemon import Daemon
    from blockbackup.daemon_options import parse_args

    for image in images:
        if not os.path.isfile(image) and not Path(image).is_block_device():
            print(f"blockbackup serve: no such image: {image}", file=sys.stderr)
            return EXIT_FAILED
    work = Path(directory or tempfile.mkdtemp(prefix="blockbackup-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    names = node_names(images)
    qmp_path = str(work / "qmp.sock")
    if listen:
        host, _, port = listen.rpartition(":")
        nbd_addr = f"addr.type=inet,addr.host={host or '127.0.0.1'},addr.port={port or '10809'}"
        uris = [f"nbd://{host or '127.0.0.1'}:{port or '10809'}/{name}" for name in names]
    else:
        sock = str(work / "nbd.sock")
        nbd_addr = f"addr.type=unix,addr.path={sock}"
        uris = [f"nbd+unix:///{name}?socket={sock}" for name in names]
    args = parse_args(serve_options(images, names, nbd_addr, qmp_path, read_only))
    exports = [
        {"image": os.path.abspath(i), "node": n, "uri": u}
        for i, n, u in zip(images, names, uris, strict=True)
    ]
    info: dict[str, Any] = {"qmp": qmp_path, "exports": exports}

    def ready() -> None:
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            print(f"QMP monitor: {qmp_path}")
            for export in exports:
                print(f"{export['node']}: {export['uri']}")
            print("Ctrl-C to stop.", flush=True)
        if on_ready is not None:
            on_ready(info)

    return await Daemon().run(args.options, on_ready=ready)


# -- QMP client commands ----------------------------------------------------------------------


async def _connect(socket: str) -> QMPClient:
    client = QMPClient("blockbackup")
    await client.connect(socket)
    return client


class ExecuteErrorLike(Exception):
    """A failure before or around a QMP command, reported like the command's own error."""


async def _qmp(socket: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    """Run commands on a short connection: a monitor serves one client at a time, so the
    backup command never holds it longer than a query (``jobs`` keeps working meanwhile)."""
    client = await _connect(socket)
    try:
        return [await client.execute(name, args) for name, args in commands]
    finally:
        await client.disconnect()


async def _job_info(socket: str, job_id: str) -> dict[str, Any] | None:
    (jobs,) = await _qmp(socket, ("query-jobs", None))
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
        from blockbackup.block.qcow2.create import create_qcow2_file

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
    (nodes,) = await _qmp(socket, ("query-named-block-nodes", None))
    sizes = {n.get("node-name"): n["image"]["virtual-size"] for n in nodes}
    if node not in sizes:
        raise ExecuteErrorLike(f"Cannot find device='{node}' nor node-name='{node}'")
    _create_target(req, int(sizes[node]))
    target_node = f"{job_id}-target"
    target = {"driver": "file", "filename": os.path.abspath(target_file)}
    await _qmp(
        socket,
        ("blockdev-add", {"driver": req.target_format, "node-name": target_node, "file": target}),
    )
    started = time.monotonic()
    try:
        await _qmp(socket, ("transaction", {"actions": _backup_actions(req, target_node)}))
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
                await _qmp(socket, ("job-dismiss", {"id": job_id}))
                return info
            await asyncio.sleep(0.2)


async def _cancel(socket: str, job_id: str) -> None:
    async def cancel() -> None:
        with _suppress_execute_error():
            await _qmp(socket, ("job-cancel", {"id": job_id}))
        while (info := await _job_info(socket, job_id)) is not None:
            if info["status"] == "concluded":
                await _qmp(socket, ("job-dismiss", {"id": job_id}))
                return
            await asyncio.sleep(0.05)

    await asyncio.shield(cancel())


async def _remove_node(socket: str, node: str) -> None:
    with _suppress_execute_error():
        await _qmp(socket, ("blockdev-del", {"node-name": node}))


class _suppress_execute_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ExecuteError | ConnectionError | EOFError)


async def backup_command(socket: str, req: BackupRequest, *, as_json: bool) -> int:
    console = Console(stderr=as_json)
    try:
        await _qmp(socket)  # fail early, with a clear text, if nobody listens there
    except Exception as exc:  # the connect error text is what the user needs
        print(f"blockbackup backup: cannot connect to {socket}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return await _run_backup(socket, req, as_json=as_json, console=console)
    except (ExecuteError, ExecuteErrorLike) as exc:
        print(f"blockbackup backup: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def bitmaps_command(
    socket: str,
    action: str,
    node: str | None,
    name: str | None,
    *,
    persistent: bool = False,
    granularity: int | None = None,
    as_json: bool = False,
) -> int:
    """``blockbackup bitmaps list|add|remove``."""
    try:
        if action == "list":
            (nodes,) = await _qmp(socket, ("query-named-block-nodes", None))
            rows = [
                {"node": n["node-name"], **bm}
                for n in nodes
                if node in (None, n["node-name"])
                for bm in n.get("dirty-bitmaps", [])
            ]
            if as_json:
                print(json.dumps(rows))
                return 0
            table = Table("node", "name", "granularity", "dirty", "recording", "persistent", "busy")
            for r in rows:
                table.add_row(
                    r["node"], r["name"], str(r["granularity"]), str(r["count"]),
                    str(r["recording"]), str(r["persistent"]), str(r["busy"]),
                )  # fmt: skip
            Console().print(table)
            return 0
        if node is None or name is None:
            print(f"blockbackup bitmaps {action}: NODE and NAME are required", file=sys.stderr)
            return EXIT_FAILED
        args: dict[str, Any] = {"node": node, "name": name}
        if action == "add":
            args["persistent"] = persistent
            if granularity is not None:
                args["granularity"] = granularity
        await _qmp(socket, (f"block-dirty-bitmap-{action}", args))
        if as_json:
            print(json.dumps({"return": {}}))
        return 0
    except (ExecuteError, ExecuteErrorLike) as exc:
        print(f"blockbackup bitmaps: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"blockbackup bitmaps: cannot connect to {socket}: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def jobs_command(socket: str, *, as_json: bool) -> int:
    try:
        client = await _connect(socket)
    except Exception as exc:  # the connect error text is what the user needs
        print(f"blockbackup jobs: cannot connect to {socket}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        jobs = await client.execute("query-jobs")
    finally:
        await client.disconnect()
    assert isinstance(jobs, list)
    if as_json:
        print(json.dumps(jobs))
        return 0
    table = Table("id", "type", "status", "progress", "error")
    for job in jobs:
        total = job.get("total-progress") or 0
        pct = f"{100 * job.get('current-progress', 0) / total:.1f}%" if total else "-"
        table.add_row(job["id"], job["type"], job["status"], pct, job.get("error", ""))
    Console().print(table)
    return 0


def run_interruptible(coro: Any) -> int:
    """Run ``coro``; Ctrl-C cancels it (the backup then cancels its job) and exits 130."""

    async def main() -> int:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return int(await task)
        except asyncio.CancelledError:
            return EXIT_INTERRUPTED

    return asyncio.run(main())
