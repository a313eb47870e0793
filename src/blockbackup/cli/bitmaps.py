"""``blockbackup bitmaps --connect QMP list|add|remove [NODE NAME]``: dirty bitmaps."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from blockbackup.cli.qmpclient import (
    Monitor,
    StopSignals,
    UsageError,
    add_connect_argument,
    run_command,
)
from blockbackup.cli.sizes import format_size, parse_size


def add_parser(sub: Any) -> None:
    bitmaps = sub.add_parser(
        "bitmaps",
        help="list, add or remove dirty bitmaps",
        description="Dirty bitmaps: what changed on a node since a point in time, for "
        "incremental backups (`blockbackup backup --start-bitmap` starts one at a backup's "
        "point in time). list [NODE]: the bitmaps (of NODE). add NODE NAME, remove NODE NAME.",
    )
    add_connect_argument(bitmaps)
    bitmaps.add_argument("action", choices=("list", "add", "remove"))
    bitmaps.add_argument("node", nargs="?", metavar="NODE", help="the node (see `backup -h`)")
    bitmaps.add_argument("name", nargs="?", metavar="NAME", help="the bitmap's name")
    bitmaps.add_argument(
        "--persistent", action="store_true", help="add: keep it across daemon restarts"
    )
    bitmaps.add_argument(
        "--granularity", type=parse_size, metavar="SIZE", help="add: bytes per bit"
    )
    bitmaps.add_argument("--json", action="store_true", help="print JSON")
    bitmaps.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    async def body(stop: StopSignals) -> int:
        monitor = Monitor(args.connect, args.timeout, stop)
        return await bitmaps_command(
            monitor,
            args.action,
            args.node,
            args.name,
            persistent=args.persistent,
            granularity=args.granularity,
            as_json=args.json,
        )

    return run_command("bitmaps", body, verbose=args.verbose)


async def bitmaps_command(
    monitor: Monitor,
    action: str,
    node: str | None,
    name: str | None,
    *,
    persistent: bool = False,
    granularity: int | None = None,
    as_json: bool = False,
) -> int:
    """``blockbackup bitmaps list|add|remove``."""
    if action != "add" and (persistent or granularity is not None):
        raise UsageError("--persistent and --granularity only apply to `bitmaps add`")
    if action == "list":
        if name is not None:
            raise UsageError("bitmaps list takes at most a NODE")
        return await _list(monitor, node, as_json=as_json)
    if node is None or name is None:
        raise UsageError(f"bitmaps {action} needs NODE and NAME")
    args: dict[str, Any] = {"node": node, "name": name}
    if action == "add":
        args["persistent"] = persistent
        if granularity is not None:
            args["granularity"] = granularity
    await monitor.execute(f"block-dirty-bitmap-{action}", args)
    if as_json:
        print(json.dumps({"return": {}}))
    return 0


async def _list(monitor: Monitor, node: str | None, *, as_json: bool) -> int:
    nodes = await monitor.execute("query-named-block-nodes")
    rows = [
        {"node": n["node-name"], **bm}
        for n in nodes
        if node in (None, n["node-name"])
        for bm in n.get("dirty-bitmaps", [])
    ]
    if as_json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no bitmaps on {node}" if node else "no bitmaps")
        return 0
    table = Table("node", "name", "granularity", "dirty", "recording", "persistent", "busy")
    for r in rows:
        table.add_row(
            r["node"],
            r.get("name", "(successor)"),
            format_size(r["granularity"]),
            format_size(r["count"]),
            str(r.get("recording", "")),
            str(r.get("persistent", "")),
            str(r.get("busy", "")),
        )
    Console().print(table)
    return 0
