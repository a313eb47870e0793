"""``blockbackup bitmaps --connect QMP list|add|remove [NODE NAME]``: dirty bitmaps."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from qemu.qmp import ExecuteError
from rich.console import Console
from rich.table import Table

from blockbackup.cli.qmpclient import EXIT_FAILED, ExecuteErrorLike, qmp
from blockbackup.cli.sizes import parse_size


def add_parser(sub: Any) -> None:
    bitmaps = sub.add_parser("bitmaps", help="list, add or remove dirty bitmaps")
    bitmaps.add_argument("--connect", required=True, metavar="QMP_SOCKET")
    bitmaps.add_argument("action", choices=("list", "add", "remove"))
    bitmaps.add_argument("node", nargs="?", metavar="NODE")
    bitmaps.add_argument("name", nargs="?", metavar="NAME")
    bitmaps.add_argument("--persistent", action="store_true")
    bitmaps.add_argument("--granularity", type=parse_size)
    bitmaps.add_argument("--json", action="store_true", help="print JSON")
    bitmaps.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(
        bitmaps_command(
            args.connect,
            args.action,
            args.node,
            args.name,
            persistent=args.persistent,
            granularity=args.granularity,
            as_json=args.json,
        )
    )


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
            (nodes,) = await qmp(socket, ("query-named-block-nodes", None))
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
        await qmp(socket, (f"block-dirty-bitmap-{action}", args))
        if as_json:
            print(json.dumps({"return": {}}))
        return 0
    except (ExecuteError, ExecuteErrorLike) as exc:
        print(f"blockbackup bitmaps: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"blockbackup bitmaps: cannot connect to {socket}: {exc}", file=sys.stderr)
        return EXIT_FAILED
