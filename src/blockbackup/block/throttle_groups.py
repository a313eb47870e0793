"""Throttle groups: the I/O limit policy shared by every ``throttle`` node of a group.

Why apart from the filter: a ``throttle`` node only waits, then forwards; what to wait for
is a property of the *group* (QEMU's ``throttle-group`` object), shared by all its member
nodes, so several disks can share one budget. Keeping the policy here (with an injectable
clock) also lets it be tested without any I/O and without wall-clock time.

The model is QEMU's leaky bucket (``limits`` of ``throttle-group``):

- one bucket per limit (``bps-total``, ``bps-read``, ``bps-write``, ``iops-*``); every
  request pours its size (bps) or one unit (iops; ``iops-size`` splits large requests
  into several units) into the ``total`` bucket and into its direction's bucket;
- a bucket leaks at its average rate. Without a burst rate it may hold a tenth of a
  second of I/O; with ``-max`` it may hold ``max * max-length`` units, and while it does,
  a second bucket leaking at ``max`` keeps the burst itself to its rate;
- a request may start when none of its buckets is over its size, otherwise it waits for
  them to leak. A request that starts is accounted in full, so the level can pass the
  size once; the next request pays for it.

Requests of one direction start in arrival order (a FIFO per group and direction).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from blockbackup.errors import BlockBackupError

__all__ = [
    "Clock",
    "LoopClock",
    "ThrottleGroup",
    "ThrottleLimits",
    "create_group",
]

#: QEMU's THROTTLE_VALUE_MAX.
VALUE_MAX = 1_000_000_000_000_000
UINT_MAX = 0xFFFFFFFF

_KINDS = ("bps", "iops")
_DIRECTIONS = ("total", "read", "write")


class Clock(Protocol):
    """Time source of a group: monotonic seconds, and a way to wait."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The event loop's monotonic clock."""

    def now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(slots=True)
class _Bucket:
    avg: int = 0
    max: int = 0
    burst_length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, seconds: float) -> None:
        self.level = max(0.0, self.level - self.avg * seconds)
        if self.max:
            self.burst_level = max(0.0, self.burst_level - self.max * seconds)

    def pour(self, units: float) -> None:
        self.level += units
        if self.burst_length > 1:
            self.burst_level += units

    def wait(self) -> float:
        """Seconds until a request may start (0: now)."""
        if not self.avg:
            return 0.0
        if not self.max:
            size, burst_size = self.avg / 10, 0.0
        else:
            size, burst_size = self.max * self.burst_length, self.max / 10
        extra = self.level - size
        if extra > 0:
            return extra / self.avg
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return extra / self.max
        return 0.0


@dataclass(slots=True)
class ThrottleLimits:
    """QEMU's ``ThrottleLimits``: ``values[(kind, direction)] = (avg, max, max_length)``."""

    values: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    iops_size: int = 0

    @classmethod
    def parse(cls, limits: Mapping[str, Any], prefix: str = "limits.") -> ThrottleLimits:
        """From QMP's ``limits`` dict (``bps-total``, ``iops-read-max``, ``iops-size``...)."""
        return cls.from_flat({k: _integer(prefix + k, v) for k, v in _known(limits, prefix)})

    @classmethod
    def from_flat(cls, flat: Mapping[str, int]) -> ThrottleLimits:
        """From validated ``key: value`` pairs with QMP's key names."""
        out = cls(iops_size=flat.get("iops-size", 0))
        for kind in _KINDS:
            for direction in _DIRECTIONS:
                base = f"{kind}-{direction}"
                triple = (flat.get(base, 0), flat.get(f"{base}-max", 0))
                length = flat.get(f"{base}-max-length", 1)
                if triple != (0, 0) or length != 1:
                    out.values[(kind, direction)] = (*triple, length)
        return out

    def check(self) -> None:
        """QEMU's validity rules and texts."""
        for kind in _KINDS:
            total = self.values.get((kind, "total"), (0, 0, 1))
            for direction in ("read", "write"):
                other = self.values.get((kind, direction), (0, 0, 1))
                if (total[0] and other[0]) or (total[1] and other[1]):
                    raise BlockBackupError(
                        "bps/iops/max total values and read/write values cannot be used at "
                        "the same time"
                    )
        for avg, mx, length in self.values.values():
            if not (0 <= avg <= VALUE_MAX and 0 <= mx <= VALUE_MAX):
                raise BlockBackupError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")
            if not length:
                raise BlockBackupError("the burst length cannot be 0")
            if length > 1 and not mx:
                raise BlockBackupError("burst length set without burst rate")
            if mx and not avg:
                raise BlockBackupError("bps_max/iops_max require corresponding bps/iops values")
            if mx and mx < avg:
                raise BlockBackupError("bps_max/iops_max cannot be lower than bps/iops")
            if not 1 <= length <= UINT_MAX:
                raise BlockBackupError(f"burst length must be between 1 and {UINT_MAX}")
        if not 0 <= self.iops_size <= VALUE_MAX:
            raise BlockBackupError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")

    def to_qmp(self) -> dict[str, int]:
        """The ``limits`` dict as QMP shows it (every member, zero when unset)."""
        out: dict[str, int] = {}
        for kind in _KINDS:
            for direction in _DIRECTIONS:
                avg, mx, length = self.values.get((kind, direction), (0, 0, 1))
                base = f"{kind}-{direction}"
                out[base], out[f"{base}-max"], out[f"{base}-max-length"] = avg, mx, length
        out["iops-size"] = self.iops_size
        return out


_KEYS = frozenset(
    [f"{k}-{d}{s}" for k in _KINDS for d in _DIRECTIONS for s in ("", "-max", "-max-length")]
    + ["iops-size"]
)


def _known(given: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    for key in given:
        if key not in _KEYS:
            raise BlockBackupError(f"Parameter '{prefix}{key}' is unexpected")
    return list(given.items())


def _integer(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise BlockBackupError(f"Parameter '{name}' expects an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BlockBackupError(f"Invalid parameter type for '{name}', expected: integer")
    return value


class ThrottleGroup:
    """One budget shared by its member nodes; :meth:`wait` admits a request."""

    def __init__(self, name: str, limits: ThrottleLimits, clock: Clock | None = None) -> None:
        limits.check()
        self.name = name
        self.clock: Clock = clock or LoopClock()
        self.members = 0
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._last = self.clock.now()
        self._queues = {"read": asyncio.Lock(), "write": asyncio.Lock()}
        self.set_limits(limits)

    @property
    def limits(self) -> ThrottleLimits:
        return self._limits

    def set_limits(self, limits: ThrottleLimits) -> None:
        """New limits; the levels poured so far are kept (as QEMU does)."""
        limits.check()
        self._limits = limits
        for key in ((k, d) for k in _KINDS for d in _DIRECTIONS):
            avg, mx, length = limits.values.get(key, (0, 0, 1))
            bucket = self._buckets.setdefault(key, _Bucket())
            bucket.avg, bucket.max, bucket.burst_length = avg, mx, length

    @property
    def enabled(self) -> bool:
        return any(b.avg for b in self._buckets.values())

    def _leak(self) -> None:
        now = self.clock.now()
        elapsed = max(0.0, now - self._last)
        self._last = now
        for bucket in self._buckets.values():
            bucket.leak(elapsed)

    def _relevant(self, direction: str) -> tuple[_Bucket, ...]:
        b = self._buckets
        return (b["bps", "total"], b["bps", direction], b["iops", "total"], b["iops", direction])

    def delay(self, is_write: bool) -> float:
        """Seconds the next request of that direction must wait (0: it may start now)."""
        self._leak()
        return max(bucket.wait() for bucket in self._relevant(_direction(is_write)))

    def account(self, is_write: bool, size: int) -> None:
        """Pour a started request into its buckets."""
        units = 1.0
        if self._limits.iops_size and size > self._limits.iops_size:
            units = size / self._limits.iops_size
        bps_total, bps_dir, iops_total, iops_dir = self._relevant(_direction(is_write))
        for bucket in (bps_total, bps_dir):
            bucket.pour(size)
        for bucket in (iops_total, iops_dir):
            bucket.pour(units)

    async def wait(self, is_write: bool, size: int, bypass: BypassCheck | None = None) -> None:
        """Wait until the request may start, then account it.

        ``bypass()`` is looked at before every wait: while it is true the request starts
        at once (a quiesced node must not wait for its limits; QEMU disables throttling
        while draining). Waiting is in slices of at most ``SLICE`` seconds so a bypass
        that starts meanwhile is seen soon.
        """
        if not self.enabled:
            return
        async with self._queues[_direction(is_write)]:
            while True:
                delay = self.delay(is_write)
                if delay <= _EPSILON or (bypass is not None and bypass()):
                    break
                # A nanosecond more (as QEMU does): floating-point leaks never fall short.
                await self.clock.sleep(min(delay + _EPSILON, SLICE))
            self.account(is_write, size)


class BypassCheck(Protocol):
    def __call__(self) -> bool: ...


#: Longest single sleep of a throttled request (seconds).
SLICE = 0.1
_EPSILON = 1e-9


def _direction(is_write: bool) -> str:
    return "write" if is_write else "read"


def create_group(name: str, props: Mapping[str, Any], clock: Clock | None = None) -> ThrottleGroup:
    """A group from ``object-add qom-type=throttle-group`` properties: ``limits`` and/or
    the legacy ``x-`` keys. The graph's :class:`~blockbackup.block.objects.ObjectRegistry`
    keeps it by name, where ``throttle`` nodes find it."""
    flat: dict[str, int] = {}
    legacy = {k.removeprefix("x-"): v for k, v in props.items() if k != "limits"}
    for key, value in _known(legacy, "x-"):
        flat[key] = _integer(f"x-{key}", value)
    given = props.get("limits")
    if given is not None:
        if not isinstance(given, Mapping):
            raise BlockBackupError("Invalid parameter type for 'limits', expected: object")
        for key, value in _known(given, "limits."):
            flat[key] = _integer(f"limits.{key}", value)
    return ThrottleGroup(name, ThrottleLimits.from_flat(flat), clock)
