"""``blockbackup snapshots --repo R [--json]``: the catalog of committed snapshots."""

from __future__ import annotations

import argparse
from typing import Any

from blockbackup.cli.repo_common import (
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    emit,
    guarded,
    open_repository,
)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("snapshots", help="list the snapshots of a repository")
    add_repo_arg(parser)
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    rows: list[dict[str, Any]] = [
        {
            "id": m.id,
            "time": m.time,
            "host": m.host,
            "disks": [{"name": d.name, "size": d.size} for d in m.disks],
        }
        for m in repo.snapshots()
    ]
    lines = [
        f"{r['id']}  {r['time']}  {r['host']}  "
        + ", ".join(f"{d['name']} ({d['size']} bytes)" for d in r["disks"])
        for r in rows
    ]
    emit(args, rows, "\n".join(lines) or "no snapshots")
    return 0
