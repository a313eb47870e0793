"""``blockbackup vm checkpoints --qmp SOCK [--repo R]``: what incrementals can start from.

Read-only: it lists each disk's checkpoints (blockbackup's bitmaps, ``bb-...``), how many
other bitmaps the disk has (never touched), anything an interrupted ``vm backup`` left in
QEMU (``bbvm-...``: the next backup removes it), and with ``--repo`` what the next backup
of each disk will be and why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from blockbackup.cli.qmpclient import CliError, Monitor, StopSignals, run_command
from blockbackup.cli.repo_common import open_secret, storage_options
from blockbackup.cli.vm_backup import previous_backup, repo_disk_name
from blockbackup.errors import BlockBackupError


def run(args: argparse.Namespace) -> int:
    args.command = "vm checkpoints"
    secret = None
    if args.repo is not None:
        try:
            secret = open_secret(args)
        except BlockBackupError as exc:
            print(f"blockbackup vm checkpoints: {exc}", file=sys.stderr)
            return 1
    return run_command("vm checkpoints", lambda stop: _main(args, secret, stop))


async def _main(args: argparse.Namespace, secret: bytes | None, stop: StopSignals) -> int:
    try:
        info = await _gather(args, secret, stop)
    except BlockBackupError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(info))
        return 0
    lines = []
    for d in info["disks"]:
        lines.append(f"{d['name']} (node {d['node']}, {d['format']}, {d['image']})")
        for c in d["checkpoints"]:
            state = "recording" if c["recording"] else "not recording"
            if c["inconsistent"]:
                state = "inconsistent"
            lines.append(f"  checkpoint {c['name']}: {state}, {c['count']} bytes changed since")
        if not d["checkpoints"]:
            lines.append("  no checkpoint")
        if d["other_bitmaps"]:
            lines.append(f"  {d['other_bitmaps']} other bitmap(s), not blockbackup's")
        if "next" in d:
            nxt = d["next"]
            why = f" ({nxt['reason']})" if nxt["reason"] else f" from {nxt['checkpoint']}"
            lines.append(f"  next backup: {nxt['mode']}{why}")
    if info["leftovers"]:
        lines.append(
            "left by an interrupted run (the next vm backup removes them): "
            + ", ".join(info["leftovers"])
        )
    print("\n".join(lines))
    return 0


async def _gather(
    args: argparse.Namespace, secret: bytes | None, stop: StopSignals
) -> dict[str, Any]:
    from blockbackup.repository.repo import Repository  # lazy: start-up cost
    from blockbackup.vm import checkpoints, names  # lazy: start-up cost
    from blockbackup.vm.qemu import Qemu  # lazy: start-up cost

    repo = None
    if args.repo is not None:
        repo = await asyncio.to_thread(Repository.open, args.repo, secret, storage_options(args))
    async with Monitor(args.qmp, args.timeout, stop).session() as client:
        qemu = Qemu(client)
        await qemu.check_capabilities()
        vm = args.vm if args.vm is not None else await qemu.name()
        disks = await qemu.disks()
        leftovers = [e["id"] for e in await qemu.execute("query-block-exports")]
        leftovers += [j["device"] for j in await qemu.execute("query-block-jobs")]
        leftovers += [str(n["node-name"]) for n in await qemu.nodes()]
    out = []
    for disk in disks:
        entry: dict[str, Any] = {
            "name": disk.name,
            "node": disk.node,
            "format": disk.format,
            "image": disk.image,
            "size": disk.size,
            "checkpoints": [
                {
                    "name": b.name,
                    "recording": b.recording,
                    "inconsistent": b.inconsistent,
                    "busy": b.busy,
                    "count": b.count,
                }
                for b in disk.bitmaps
                if names.is_checkpoint(b.name)
            ],
            "other_bitmaps": sum(1 for b in disk.bitmaps if not names.is_checkpoint(b.name)),
        }
        if repo is not None:
            name = repo_disk_name(vm, disk.name)
            previous = await asyncio.to_thread(previous_backup, repo, name)
            plan = checkpoints.plan(disk, previous, full=False, granularity=repo.chunk_size)
            entry["repository_name"] = name
            entry["next"] = {
                "mode": plan.mode,
                "checkpoint": plan.checkpoint,
                "reason": plan.reason,
            }
        out.append(entry)
    return {"disks": out, "leftovers": sorted({x for x in leftovers if names.is_ours(x)})}
