"""RateLimit against a hand-driven clock: quotas per slice, oversized chunks, long-run rate."""

from __future__ import annotations

import pytest

from blockbackup.block.ratelimit import RateLimit

MIB = 1024 * 1024
KIB = 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_unlimited_never_waits(clock: FakeClock) -> None:
    rl = RateLimit(clock=clock)
    for _ in range(100):
        assert rl.delay_for(64 * MIB) == 0.0
        rl.charge(64 * MIB)
    assert rl.speed == 0


def test_quota_per_slice(clock: FakeClock) -> None:
    rl = RateLimit(MIB, clock=clock)  # quota 104857.6 bytes per 100 ms slice
    assert rl.delay_for(64 * KIB) == 0.0
    rl.charge(64 * KIB)
    clock.now += 0.03
    assert rl.delay_for(64 * KIB) == 0.0  # quota left: admitted, although it overshoots
    rl.charge(64 * KIB)  # 128 KiB in a 102.4 KiB slice: the slice stretches to 125 ms
    assert rl.delay_for(1) == pytest.approx(0.095)
    clock.now += 0.095
    assert rl.delay_for(64 * KIB) == 0.0  # the slice is over


def test_exact_quota_exhausts_slice(clock: FakeClock) -> None:
    rl = RateLimit(10 * KIB, clock=clock)  # 1024 bytes per slice
    rl.charge(512)
    assert rl.delay_for(512) == 0.0
    rl.charge(512)
    assert rl.delay_for(1) == pytest.approx(0.1)


def test_oversized_chunk_allowed_when_fresh_then_slice_stretches(clock: FakeClock) -> None:
    rl = RateLimit(256 * KIB, clock=clock)
    assert rl.delay_for(MIB) == 0.0
    rl.charge(MIB)
    assert rl.delay_for(1) == pytest.approx(4.0)  # 1 MiB at 256 KiB/s
    clock.now += 3.9
    assert rl.delay_for(1) == pytest.approx(0.1)
    clock.now += 0.1
    assert rl.delay_for(MIB) == 0.0


@pytest.mark.parametrize(("speed", "chunk"), [(MIB, 64 * KIB), (256 * KIB, MIB), (10 * MIB, MIB)])
def test_long_run_rate_matches_speed(clock: FakeClock, speed: int, chunk: int) -> None:
    rl = RateLimit(speed, clock=clock)
    start = clock.now
    sent = 0
    total = 64 * MIB
    while sent < total:
        delay = rl.delay_for(chunk)
        if delay > 0:
            clock.now += delay
            continue
        rl.charge(chunk)
        sent += chunk
    # The last chunk is admitted without waiting for it to "drain", so the elapsed time is
    # within one chunk (or slice) of total/speed, and never shorter.
    elapsed = clock.now - start
    ideal = total / speed
    assert ideal - (chunk / speed + RateLimit.SLICE) - 1e-6 <= elapsed <= ideal + 1e-6


def test_set_speed(clock: FakeClock) -> None:
    rl = RateLimit(256 * KIB, clock=clock)
    rl.charge(MIB)
    assert rl.delay_for(1) == pytest.approx(4.0)
    rl.set_speed(1 * MIB)  # faster: the current slice is re-measured
    assert rl.delay_for(1) == pytest.approx(1.0)
    rl.set_speed(0)
    assert rl.delay_for(MIB) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        rl.set_speed(-1)


def test_speed_from_zero_starts_fresh(clock: FakeClock) -> None:
    rl = RateLimit(clock=clock)
    rl.charge(10 * MIB)  # not accounted while unlimited
    rl.set_speed(MIB)
    assert rl.delay_for(MIB) == 0.0
