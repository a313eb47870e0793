"""``blockbackup verify --repo R [SNAPSHOT...] [--json]``: re-read and re-check snapshots.

Exit status 0 when everything checked is intact, 1 otherwise; every damaged chunk is named
with each snapshot, disk and offset that uses it.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from blockbackup.cli.repo_common import (
    EXIT_FAILED,
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    emit,
    guarded,
    open_repository,
    requests_of,
)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("verify", help="re-read and check snapshots (default: all)")
    add_repo_arg(parser)
    parser.add_argument("snapshots", nargs="*", metavar="SNAPSHOT", help="latest, id or prefix")
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.repository import catalog  # lazy: start-up cost
    from blockbackup.repository.verify import verify  # lazy: start-up cost

    repo = open_repository(args)
    ids = [catalog.resolve(repo.backend, s) for s in args.snapshots] or repo.snapshot_ids()
    manifests = [repo.manifest(i) for i in ids]
    console = Console(stderr=True)
    with Progress(
        TextColumn("verify"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=args.json or not console.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task("verify", total=None)
        report = verify(
            repo, manifests, lambda done, total: progress.update(task, completed=done, total=total)
        )
    lines = [
        f"checked {report.snapshots} snapshots, {report.chunks} chunks in {report.packs} packs"
    ]
    for pack, why in sorted(report.damaged_packs.items()):
        lines.append(f"damaged pack {pack}: {why}")
    for d in report.damage:
        where = "its disk index" if d.offset is None else f"offset {d.offset}"
        lines.append(f"damaged: snapshot {d.snapshot} disk {d.disk} {where}: {d.error}")
    lines.append("ok" if report.ok else "DAMAGED")
    emit(args, {**report.to_json(), "requests": requests_of(repo)}, "\n".join(lines))
    return 0 if report.ok else EXIT_FAILED
