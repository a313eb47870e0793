"""Throttle groups and the ``throttle`` filter, measured on a virtual clock.

Why a fake clock: limits are about time, and tests never assert wall-clock times. The
clock below advances only when a throttled request sleeps, so the virtual time a run of
requests takes is exactly what the policy charged for it.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from blockbackup.api import BlockBackup
from blockbackup.block.objects import ObjectRegistry
from blockbackup.block.throttle_groups import ThrottleGroup, ThrottleLimits, create_group
from blockbackup.errors import BlockBackupError
from testkit.images import make_image, raw_node

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

KiB = 1024
MiB = 1024 * KiB
_names = itertools.count()


class FakeClock:
    """Virtual time: ``sleep`` moves it forward (never backward) and yields once."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


def group(limits: dict[str, Any], clock: FakeClock) -> ThrottleGroup:
    return ThrottleGroup(f"g{next(_names)}", ThrottleLimits.parse(limits), clock)


async def run(g: ThrottleGroup, n: int, size: int, *, is_write: bool = True) -> None:
    for _ in range(n):
        await g.wait(is_write, size)


async def test_bps_average() -> None:
    clock = FakeClock()
    g = group({"bps-write": MiB}, clock)
    await run(g, 41, 256 * KiB)
    # 41 requests: the first 40 must leak away, less the tenth of a second the bucket holds
    assert clock.t == pytest.approx(40 * 256 * KiB / MiB - 0.1, abs=0.01)
    await run(g, 10, 256 * KiB, is_write=False)  # reads are not limited
    assert clock.t == pytest.approx(9.9, abs=0.01)


async def test_bps_total_counts_both_directions() -> None:
    clock = FakeClock()
    g = group({"bps-total": MiB}, clock)
    for i in range(20):
        await g.wait(i % 2 == 0, 512 * KiB)
    assert clock.t == pytest.approx(19 * 0.5 - 0.1, abs=0.01)


async def test_iops_and_iops_size() -> None:
    clock = FakeClock()
    g = group({"iops-total": 10}, clock)
    await run(g, 101, 4 * KiB)
    assert clock.t == pytest.approx(100 / 10 - 0.1, abs=0.01)
    clock2 = FakeClock()
    g2 = group({"iops-total": 10, "iops-size": 4 * KiB}, clock2)
    await run(g2, 11, 40 * KiB)  # each one counts as 10 operations
    assert clock2.t == pytest.approx(10 * 10 / 10 - 0.1, abs=0.01)


async def test_burst_then_average() -> None:
    clock = FakeClock()
    # 1 MiB/s on average; bursts at up to 10 MiB/s for 2 s (a bucket of 20 MiB)
    g = group({"bps-write": MiB, "bps-write-max": 10 * MiB, "bps-write-max-length": 2}, clock)
    await run(g, 16, MiB)
    burst_time = clock.t
    assert burst_time < 2.0  # the burst runs at (about) the burst rate, not at 1 MiB/s
    assert burst_time == pytest.approx(15 * MiB / (10 * MiB + MiB), abs=0.3)
    await run(g, 20, MiB)  # the 20 MiB bucket fills up: the average rate rules now
    # 36 requests: 35 MiB had to leave, 20 of them may stay in the bucket, at 1 MiB/s
    assert clock.t == pytest.approx(35 - 20, abs=0.1)


async def test_fifo_and_shared_by_members(tmp_path: Path) -> None:
    clock = FakeClock()
    g = create_group("shared", {"limits": {"bps-write": MiB}}, clock)
    async with BlockBackup() as bb:
        bb.graph.objects.insert(g.name, g)
        for name in ("a", "b"):
            path = make_image(tmp_path / f"{name}.img", 4 * MiB)
            await bb.blockdev_add(raw_node(f"{name}-raw", path))
            await bb.blockdev_add(
                {
                    "driver": "throttle",
                    "node-name": name,
                    "throttle-group": g.name,
                    "file": f"{name}-raw",
                }
            )
        assert g.members == 2
        a, b = bb.graph.get("a"), bb.graph.get("b")
        data = b"\x01" * (256 * KiB)
        async with asyncio.TaskGroup() as tg:
            for i in range(8):
                tg.create_task(a.write(i * len(data), data))
                tg.create_task(b.write(i * len(data), data))
        # 16 writes of 256 KiB share 1 MiB/s
        assert clock.t == pytest.approx(15 * 0.25 - 0.1, abs=0.01)
        with pytest.raises(BlockBackupError, match="in use, can not be deleted"):
            bb.object_del(g.name)
    assert g.members == 0


async def test_quiesce_is_not_held_by_limits(tmp_path: Path) -> None:
    async with BlockBackup() as bb:
        # the real clock: 1 byte/s
        bb.object_add({"qom-type": "throttle-group", "id": "slow", "limits": {"bps-write": 1}})
        path = make_image(tmp_path / "t.img", MiB)
        await bb.blockdev_add(raw_node("t-raw", path))
        node = await bb.blockdev_add(
            {"driver": "throttle", "node-name": "t", "throttle-group": "slow", "file": "t-raw"}
        )
        await node.write(0, b"\x01" * 4096)  # fills the bucket for about an hour
        stuck = asyncio.create_task(node.write(4096, b"\x02" * 4096))
        await asyncio.sleep(0.05)
        assert not stuck.done()
        async with asyncio.timeout(5):
            async with node.quiesced():
                assert stuck.done()


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"bps-total": 100, "bps-read": 5}, "total values and read/write values cannot"),
        ({"bps-total-max": 100}, "bps_max/iops_max require corresponding bps/iops values"),
        ({"bps-total": 100, "bps-total-max": 50}, "cannot be lower than bps/iops"),
        ({"bps-total": 100, "bps-total-max-length": 5}, "burst length set without burst rate"),
        ({"bps-total": -1}, r"must be within \[0, 1000000000000000\]"),
        ({"iops-total": 1, "iops-total-max": 2, "iops-total-max-length": 0}, "cannot be 0"),
        ({"bogus": 1}, "Parameter 'limits.bogus' is unexpected"),
    ],
)
async def test_limit_errors(limits: dict[str, Any], message: str) -> None:
    with pytest.raises(BlockBackupError, match=message):
        create_group(f"bad{next(_names)}", {"limits": limits})


async def test_object_registry_and_legacy_keys(tmp_path: Path) -> None:
    objects = ObjectRegistry()
    name = f"leg{next(_names)}"
    g = objects.add("throttle-group", name, {"x-bps-total": 1000, "x-iops-total": 5})
    assert isinstance(g, ThrottleGroup)
    assert g.limits.to_qmp()["bps-total"] == 1000
    assert g.limits.to_qmp()["iops-total"] == 5
    async with BlockBackup() as bb:
        with pytest.raises(BlockBackupError, match="Throttle group 'nog' does not exist"):
            await bb.blockdev_add(
                {
                    "driver": "throttle",
                    "node-name": "t",
                    "throttle-group": "nog",
                    "file": {"driver": "null-co"},
                }
            )
    objects.delete(name)
    assert objects.throttle_group(name) is None
