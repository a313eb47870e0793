"""``blockbackup prune --repo R --keep-last N --keep-daily N ... [--dry-run]``.

Proxmox's keep-* rules per group of disks (:mod:`blockbackup.repository.prune`); removes
manifests only, so it is quick; ``gc`` (to come) frees the data no snapshot uses.

A manifest that cannot be read is never removed and counts for no rule (its time and disks
are unknown): it is named on stderr and in the JSON (``damaged``), and the others are
pruned as if it were not there. Removing it is a decision for a person (``verify`` shows
it; deleting ``snapshots/ID`` by hand forgets it).
"""

from __future__ import annotations

import argparse
import sys
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
from blockbackup.errors import BlockBackupError

KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("prune", help="remove snapshots a retention policy does not keep")
    add_repo_arg(parser)
    for rule in KEEP:
        parser.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    parser.add_argument("--dry-run", action="store_true", help="only show what would go")
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.repository import catalog  # lazy: start-up cost
    from blockbackup.repository.prune import Policy, plan  # lazy: start-up cost

    policy = Policy(**{rule: getattr(args, f"keep_{rule}") for rule in KEEP})
    if any(getattr(args, f"keep_{rule}") < 0 for rule in KEEP):
        raise BlockBackupError("--keep-* counts must not be negative")
    if policy.empty():
        raise BlockBackupError(
            "give at least one --keep-* option above 0 (prune never removes every snapshot)"
        )
    repo = open_repository(args)
    with counting("read snapshots", quiet=args.json) as update:
        manifests, damaged = catalog.read_many(repo.backend, repo.keys, repo.snapshot_ids(), update)
    for snapshot_id, why in damaged.items():
        print(
            f"blockbackup prune: snapshot {snapshot_id} is damaged ({why}): kept, not counted",
            file=sys.stderr,
        )
    kept, removed = plan(manifests, policy)
    if not args.dry_run:
        with counting("remove snapshots", quiet=args.json) as update:
            for done, manifest in enumerate(removed, 1):
                repo.forget(manifest.id)
                update(done, len(removed))
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"keep {i} ({rule})" for i, rule in sorted(kept.items())]
    lines += [f"{verb} {m.id}" for m in removed]
    data = {
        "kept": kept,
        "removed": [m.id for m in removed],
        "dry_run": args.dry_run,
        "damaged": damaged,
    }
    emit(args, data, "\n".join(lines) or "no snapshots")
    return 0
