"""Retention: Proxmox's keep-* rules (a period an earlier rule covered is skipped), per
group of disks."""

from __future__ import annotations

from datetime import datetime

from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.prune import Policy, plan


def snap(when: str, disk: str = "vda") -> Manifest:
    t = datetime.strptime(when, "%Y-%m-%d %H:%M")
    return Manifest(
        id=f"{t:%Y%m%dT%H%M%S}.000000Z-{disk}",
        time=t.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
        host="h",
        disks=[DiskRecord(disk, 0, 65536, [])],
    )


def test_rules_apply_in_order_skipping_covered_periods() -> None:
    daily = [snap(f"2026-01-{d:02d} 12:00") for d in range(1, 15)]
    extra = [snap("2026-01-14 18:00"), snap("2026-01-14 20:00")]
    other = [snap("2025-06-01 00:00", disk="vdb")]
    kept, removed = plan(daily + extra + other, Policy(last=2, daily=3, weekly=2))
    by_day = {m.id: m.time[:16] for m in daily + extra + other}
    assert {by_day[i]: rule for i, rule in kept.items()} == {
        "2026-01-14T20:00": "last",
        "2026-01-14T18:00": "last",
        "2026-01-13T12:00": "daily",  # the 14th is covered by keep-last
        "2026-01-12T12:00": "daily",
        "2026-01-11T12:00": "daily",
        "2026-01-04T12:00": "weekly",  # ISO week 1 (weeks 2 and 3 are covered)
        "2025-06-01T00:00": "last",  # another disk: its own group
    }
    assert sorted(m.time[:10] for m in removed) == [
        f"2026-01-{d:02d}" for d in (1, 2, 3, 5, 6, 7, 8, 9, 10, 14)
    ]


def test_monthly_and_yearly_keep_the_newest_of_each_period() -> None:
    snaps = [
        snap(f"{y}-{m:02d}-{d:02d} 00:00") for y in (2024, 2025) for m in (1, 6) for d in (1, 20)
    ]
    kept, _removed = plan(snaps, Policy(monthly=2, yearly=5))
    days = sorted(m.time[:10] for m in snaps if m.id in kept)
    assert days == ["2024-06-20", "2025-01-20", "2025-06-20"]  # 2025 covered by monthly


def test_an_empty_policy_is_detected() -> None:
    assert Policy().empty()
    assert not Policy(yearly=1).empty()
