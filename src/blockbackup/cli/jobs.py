"""``blockbackup jobs --connect QMP``: the jobs of a running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from blockbackup.cli.qmpclient import EXIT_FAILED, connect


def add_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="list the jobs of a running daemon")
    jobs.add_argument("--connect", required=True, metavar="QMP_SOCKET")
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(jobs_command(args.connect, as_json=args.json))


async def jobs_command(socket: str, *, as_json: bool) -> int:
    try:
        client = await connect(socket)
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
