"""``blockbackup snapshots --repo R [--json]``: the catalog of committed snapshots.

A manifest that cannot be read (bit rot, truncation) is listed as damaged, with why, and
the others are listed as usual (exit status 0: the listing itself worked; ``verify``
fails on it).
"""

from __future__ import annotations

import argparse
from typing import Any

from blockbackup.cli.counting import counting
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
    from blockbackup.repository import catalog  # lazy: start-up cost

    repo = open_repository(args)
    with counting("read snapshots", quiet=args.json) as update:
        manifests, damaged = catalog.read_many(repo.backend, repo.keys, repo.snapshot_ids(), update)
    rows: list[dict[str, Any]] = [
        {
            "id": m.id,
            "time": m.time,
            "host": m.host,
            "disks": [{"name": d.name, "size": d.size} for d in m.disks],
        }
        for m in manifests
    ]
    rows += [{"id": i, "damaged": why} for i, why in damaged.items()]
    rows.sort(key=lambda r: str(r["id"]))
    lines = [
        f"{r['id']}  DAMAGED: {r['damaged']}"
        if "damaged" in r
        else f"{r['id']}  {r['time']}  {r['host']}  "
        + ", ".join(f"{d['name']} ({d['size']} bytes)" for d in r["disks"])
        for r in rows
    ]
    emit(args, rows, "\n".join(lines) or "no snapshots")
    return 0
