"""``blockbackup verify --repo R [SNAPSHOT...] [--sample PERCENT] [--skip-verified-within DAYS]``:
re-read and re-check snapshots.

Exit status 0 when everything checked is intact, 1 otherwise; every damaged chunk is named
with each snapshot, disk and offset that uses it, and a snapshot whose manifest cannot be
read is named as damaged while the others are checked. ``--sample`` reads a random share of
the data packs (every disk index segment is always read); ``--skip-verified-within`` skips
packs that passed a verify within that many days (:mod:`.verify_select` records them).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from blockbackup.cli.counting import counting
from blockbackup.cli.repo_common import (
    EXIT_FAILED,
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    emit,
    guarded,
    open_repository,
)
from blockbackup.errors import BlockBackupError


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError("a percentage above 0, at most 100")
    return value


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("verify", help="re-read and check snapshots (default: all)")
    add_repo_arg(parser)
    parser.add_argument("snapshots", nargs="*", metavar="SNAPSHOT", help="latest, id or prefix")
    parser.add_argument(
        "--sample",
        type=_percent,
        metavar="PERCENT",
        help="read only a random PERCENT of the data packs (index segments: all)",
    )
    parser.add_argument("--seed", type=int, help="with --sample: repeat the same draw")
    parser.add_argument(
        "--skip-verified-within",
        type=_days,
        metavar="DAYS",
        help="skip packs that passed a verify within DAYS days",
    )
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.repository import catalog  # lazy: start-up cost
    from blockbackup.repository.verify import verify  # lazy: start-up cost
    from blockbackup.repository.verify_select import Selection  # lazy: start-up cost

    if args.seed is not None and args.sample is None:
        raise BlockBackupError("--seed only applies to --sample")
    repo = open_repository(args)
    ids = [catalog.resolve(repo.backend, s) for s in args.snapshots] or repo.snapshot_ids()
    with counting("read snapshots", quiet=args.json) as update:
        manifests, unreadable = catalog.read_many(repo.backend, repo.keys, ids, update)
    within = args.skip_verified_within
    selection = Selection(
        sample=args.sample,
        seed=args.seed,
        skip_within=None if within is None else timedelta(days=within),
    )
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
            repo,
            manifests,
            lambda done, total: progress.update(task, completed=done, total=total),
            selection,
            unreadable,
        )
    emit(args, report.to_json(), "\n".join(_lines(report, args)))
    return 0 if report.ok else EXIT_FAILED


def _lines(report: Any, args: argparse.Namespace) -> list[str]:
    lines = [
        f"checked {report.snapshots} snapshots, {report.chunks} chunks in {report.packs} packs"
    ]
    if report.skipped_recent:
        lines.append(
            f"skipped {report.skipped_recent} packs verified within "
            f"{args.skip_verified_within:g} days"
        )
    if report.skipped_sample:
        lines.append(f"skipped {report.skipped_sample} packs not in the {args.sample:g}% sample")
    if report.record_error is not None:
        lines.append(f"note: could not record the verified packs: {report.record_error}")
    for snapshot, why in sorted(report.damaged_snapshots.items()):
        lines.append(f"damaged snapshot {snapshot}: its manifest cannot be read: {why}")
    for pack, why in sorted(report.damaged_packs.items()):
        lines.append(f"damaged pack {pack}: {why}")
    for d in report.damage:
        where = "its disk index" if d.offset is None else f"offset {d.offset}"
        lines.append(f"damaged: snapshot {d.snapshot} disk {d.disk} {where}: {d.error}")
    lines.append("ok" if report.ok else "DAMAGED")
    return lines
