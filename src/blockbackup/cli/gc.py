"""``blockbackup gc --repo R [--dry-run] [--forget-writer ID] [--json]``: free unused data.

Safe while backups, prunes and other gcs run, and safe to kill: it condemns packs no
snapshot uses and deletes the ones condemned before every running backup started
(:mod:`blockbackup.repository.gc`, docs/repository.md). Prints a one-line summary.
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
    parser = sub.add_parser("gc", help="free the data no snapshot uses")
    add_repo_arg(parser)
    parser.add_argument("--dry-run", action="store_true", help="only show what would go")
    parser.add_argument(
        "--forget-writer",
        action="append",
        default=[],
        metavar="ID",
        help="drop a dead writer's marker (see the report's writers); repeatable",
    )
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.repository.gc import collect  # lazy: start-up cost

    repo = open_repository(args)
    with counting("gc", quiet=args.json) as update:

        def show(step: str, done: int, total: int | None) -> None:
            update(done, total, step)

        report = collect(repo, args.dry_run, args.forget_writer, show)
    lines = [f"running writer {w['id']} (host {w.get('host', '?')})" for w in report.writers]
    lines += [
        f"ignored writer {w['id']} (host {w.get('host', '?')}): older than 24 h; "
        f"drop it with --forget-writer {w['id']}"
        for w in report.ignored_writers
    ]
    lines += [f"removed the marker of ended writer {w['id']}" for w in report.removed_writers]
    lines.append(("dry run: " if args.dry_run else "") + report.summary())
    emit(args, report.to_json(), "\n".join(lines))
    return 0
