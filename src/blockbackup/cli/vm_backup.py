"""``blockbackup vm backup --qmp SOCK --repo R [--disk D ...] [--full]``.

One run, step by step (``blockbackup/vm/fleece.py`` has the QMP sequence):

1. Open the repository, connect to the monitor (held for the whole run: it serves one
   client at a time, so no other ``vm backup`` can interleave), check QEMU has what we
   need, remove what an interrupted run left.
2. Per disk, decide full or incremental (``vm/checkpoints.py``); say why when a checkpoint
   cannot be used.
3. Build the point-in-time views and export them; read them into the repository; commit one
   snapshot for all disks.
4. Always remove what this run made in QEMU. After a commit, each disk keeps only the new
   checkpoint; after a failure or a signal, the checkpoints are as they were.

Signals (Ctrl-C, SIGTERM, SIGHUP) stop the copy; the undoing of step 4 still runs.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from typing import Any

from blockbackup.cli.qmpclient import CliError, Monitor, StopSignals, run_command
from blockbackup.cli.repo_common import (
    copy_with_progress,
    open_secret,
    secret_object,
    storage_options,
)
from blockbackup.errors import BlockBackupError


def repo_disk_name(vm: str, disk: str) -> str:
    """A disk's name in the repository: ``VM/DISK`` when the VM has a name."""
    return f"{vm}/{disk}" if vm else disk


def previous_backup(repo: Any, name: str) -> Any:
    """The latest snapshot of disk ``name`` as a :class:`~blockbackup.vm.checkpoints.Previous`."""
    from blockbackup.repository import catalog  # lazy: start-up cost
    from blockbackup.vm.checkpoints import Previous  # lazy: start-up cost

    manifest = catalog.latest_with_disk(repo.backend, repo.keys, name)
    if manifest is None:
        return None
    record = manifest.disk(name)
    return Previous(manifest.id, record.size, dict(record.source))


def select_disks(disks: list[Any], wanted: list[str]) -> list[Any]:
    if not disks:
        raise CliError("the VM has no writable disk")
    if not wanted:
        return disks
    chosen = []
    for name in wanted:
        found = [d for d in disks if d.matches(name)]
        if not found:
            known = ", ".join(d.name for d in disks)
            raise CliError(f"the VM has no disk {name!r} (its disks: {known})")
        if found[0] not in chosen:
            chosen.append(found[0])
    return chosen


def _warn_scratch_space(scratch: str, disks: int, version: str) -> None:
    """QEMU before 10.1 fails a guest's write when the copy-before-write copy cannot be
    stored: with ``--thin-scratch`` (nothing reserved), say so when the scratch space is
    smaller than the disks."""
    try:
        free = shutil.disk_usage(scratch).free
    except OSError:
        return  # the scratch directory's own error comes when it is used
    if free < disks:
        note(
            f"{scratch} has {free} bytes free and the disks {disks}: if the guest rewrites "
            f"more than that during the backup, QEMU {version} fails its writes"
        )


def note(text: str) -> None:
    print(f"blockbackup vm backup: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    args.command = "vm backup"
    try:
        secret = open_secret(args)
    except BlockBackupError as exc:
        print(f"blockbackup vm backup: {exc}", file=sys.stderr)
        return 1
    return run_command("vm backup", lambda stop: _main(args, secret, stop), verbose=args.verbose)


async def _main(args: argparse.Namespace, secret: bytes | None, stop: StopSignals) -> int:
    try:
        result = await _backup(args, secret, stop)
    except (BlockBackupError, OSError) as exc:
        text = str(exc) if isinstance(exc, BlockBackupError) else (exc.strerror or str(exc))
        raise CliError(text) from None
    if args.json:
        import json  # lazy: start-up cost

        print(json.dumps(result))
    else:
        parts = []
        for d in result["disks"]:
            what = d["mode"]
            if d["dirty_bytes"] is not None:
                what += f", {d['dirty_bytes']} bytes changed"
            parts.append(f"{d['name']} ({what})")
        print(
            f"snapshot {result['snapshot']}: {', '.join(parts)}; "
            f"{result['stored_bytes']} bytes stored in {result['stored_chunks']} new chunks"
        )
    return 0


async def _backup(
    args: argparse.Namespace, secret: bytes | None, stop: StopSignals
) -> dict[str, Any]:
    from blockbackup.repository.errors import RepositoryError  # lazy: start-up cost
    from blockbackup.repository.repo import Repository  # lazy: start-up cost
    from blockbackup.vm import checkpoints, names  # lazy: start-up cost
    from blockbackup.vm.fleece import Session, remove_leftovers  # lazy: start-up cost
    from blockbackup.vm.pull import pull_all  # lazy: start-up cost
    from blockbackup.vm.qemu import Qemu  # lazy: start-up cost

    try:
        repo = await asyncio.to_thread(Repository.open, args.repo, secret, storage_options(args))
    except RepositoryError as exc:
        raise CliError(str(exc)) from None
    async with Monitor(args.qmp, args.timeout, stop).session() as client:
        qemu = Qemu(client)
        await qemu.check_capabilities()
        removed = await remove_leftovers(qemu, args.qmp, args.scratch_dir)
        if removed:
            note(f"removed what an interrupted run left: {', '.join(removed)}")
        vm = args.vm if args.vm is not None else await qemu.name()
        disks = select_disks(await qemu.disks(), args.disk)
        plans = []
        for disk in disks:
            name = repo_disk_name(vm, disk.name)
            previous = await asyncio.to_thread(previous_backup, repo, name)
            plan = checkpoints.plan(disk, previous, full=args.full, granularity=repo.chunk_size)
            if plan.fallback:
                note(f"{name}: full backup: {plan.reason}")
            plans.append((disk, plan))
        session = Session(qemu, names.new_run_id(), args.scratch_dir, args.qmp)
        session.break_snapshot = await qemu.command_takes("blockdev-backup", "on-cbw-error")
        # with on-cbw-error a full scratch breaks the backup, not the guest: no reservation
        session.reserve = not session.break_snapshot and not args.thin_scratch
        if not session.break_snapshot and args.thin_scratch:
            _warn_scratch_space(args.scratch_dir, sum(d.size for d, _ in plans), qemu.version)
        repo_disks = [repo_disk_name(vm, d.name) for d, _ in plans]

        async def copy(bb: Any, source: str, target: str, label: str, job: dict[str, Any]) -> None:
            # only the copies are cut short by a signal: the commit that follows them is
            # one write, and a snapshot must not appear after the run undid its checkpoint
            await stop.interrupt(copy_with_progress(bb, source, target, label, args.json, **job))

        try:
            stop.check()
            await session.start(plans, repo.chunk_size)
            stop.check()
            sources = [
                {
                    "vm": vm,
                    "qemu-disk": view.disk.name,
                    "qemu-node": view.disk.node,
                    "image": view.disk.image,
                    "mode": view.plan.mode,
                    **({"checkpoint": view.new_checkpoint} if view.new_checkpoint else {}),
                }
                for view in session.views
            ]
            result = await pull_all(
                session.views,
                session.nbd_socket,
                repo_disks,
                args.repo,
                secret_object(secret),
                copy,
                sources,
                {"vm": vm} if vm else {},
                session.release,
                storage_options(args),
            )
        except BaseException:
            problems = await session.teardown()
            problems += await session.remove_new_checkpoints()
            for problem in problems:
                note(f"could not undo: {problem}")
            raise
        try:  # the snapshot is committed: what fails now is only reported
            problems = await session.teardown()
            problems += await session.keep_new_checkpoints()
        except BlockBackupError as exc:
            problems = [f"{exc} (the next vm backup removes what is left)"]
        for problem in problems:
            note(f"after snapshot {result.snapshot} was committed: {problem}")
    return {
        "snapshot": result.snapshot,
        "disks": [
            {
                "name": repo_disks[n],
                "qemu_disk": view.disk.name,
                "mode": view.plan.mode,
                "reason": view.plan.reason,
                "base": view.plan.base,
                "checkpoint": view.new_checkpoint,
                "size": view.disk.size,
                "dirty_bytes": result.pulled[n].dirty_bytes,
            }
            for n, view in enumerate(session.views)
        ],
        "stored_chunks": result.stored_chunks,
        "stored_bytes": result.stored_bytes,
        "reused_chunks": result.reused_chunks,
        "removed_leftovers": removed,
    }
