"""Prune: which snapshots a retention policy keeps (Proxmox Backup Server's keep-* rules).

Rules apply in the order last, hourly, daily, weekly, monthly, yearly. Each rule walks the
snapshots newest first and keeps the newest snapshot of each period (hour, day, ISO week,
month, year) until it has kept its count; a period that holds a snapshot an earlier rule
kept is already covered and skipped, so each rule reaches further back. Snapshots group
by their set of disk names (one group per disk, or per VM's disk set); each group is pruned
alone. Prune deletes manifests only: the data they alone
used is freed by gc (designed, docs/repository.md), so prune is quick and safe to kill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from blockbackup.repository.catalog import Manifest

RULES: tuple[tuple[str, Callable[[datetime], str]], ...] = (
    ("hourly", lambda t: t.strftime("%Y-%m-%d %H")),
    ("daily", lambda t: t.strftime("%Y-%m-%d")),
    ("weekly", lambda t: "{:04d}-W{:02d}".format(*t.isocalendar()[:2])),
    ("monthly", lambda t: t.strftime("%Y-%m")),
    ("yearly", lambda t: t.strftime("%Y")),
)


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))


def _time(manifest: Manifest) -> datetime:
    return datetime.strptime(manifest.time, "%Y-%m-%dT%H:%M:%S.%fZ")


def group_of(manifest: Manifest) -> tuple[str, ...]:
    return tuple(sorted(d.name for d in manifest.disks))


def _keep_group(snapshots: list[Manifest], policy: Policy) -> dict[str, str]:
    """id -> the rule that keeps it, for one group (``snapshots`` newest first)."""
    kept: dict[str, str] = {}
    rules: list[tuple[str, Callable[[datetime], str] | None]] = [("last", None), *RULES]
    for name, period in rules:
        count = int(getattr(policy, name))
        if count <= 0:
            continue
        key_of: Callable[[Manifest], str] = (
            (lambda m: m.id) if period is None else (lambda m, p=period: p(_time(m)))  # type: ignore[misc]
        )
        covered = {key_of(m) for m in snapshots if m.id in kept}
        periods: set[str] = set()
        for manifest in snapshots:
            if manifest.id in kept:
                continue
            key = key_of(manifest)
            if key in covered or key in periods:
                continue  # a period an earlier rule covered, or this rule's newer one
            if len(periods) >= count:
                break
            periods.add(key)
            kept[manifest.id] = name
    return kept


def plan(manifests: list[Manifest], policy: Policy) -> tuple[dict[str, str], list[Manifest]]:
    """(kept id -> rule, snapshots to remove) for every group of ``manifests``."""
    groups: dict[tuple[str, ...], list[Manifest]] = {}
    for manifest in manifests:
        groups.setdefault(group_of(manifest), []).append(manifest)
    kept: dict[str, str] = {}
    for members in groups.values():
        members.sort(key=lambda m: (_time(m), m.id), reverse=True)
        kept.update(_keep_group(members, policy))
    return kept, [m for m in manifests if m.id not in kept]
