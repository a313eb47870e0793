"""Rate limiting of a job's background work (never of guest writes or CBW copies).

Time is cut into 100 ms slices; each slice may carry ``speed * 0.1`` bytes. Requests are
admitted while the current slice has quota left, even one that overshoots it (so a fresh
slice admits a chunk larger than the whole quota); the overshoot is paid by stretching the
slice in proportion, so the next request waits longer. A 1 MiB chunk at 256 KiB/s makes
the next one wait about 4 s (progress moves in whole-chunk steps at low speeds, as in
QEMU), and the long-run rate equals ``speed`` whatever the chunk size.

The clock is injectable (``clock=``) so tests drive time by hand and never sleep.

Why in ``block/``: block-copy's background pass applies the limit and the job only sets
its speed (``block-job-set-speed``); the block layer imports nothing from ``jobs/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar


class RateLimit:
    """A slice-based byte budget: ask :meth:`delay_for`, do the work, then :meth:`charge`.

    :param speed: bytes per second; 0 means unlimited.
    :param clock: monotonic seconds (``time.monotonic`` by default).
    """

    SLICE: ClassVar[float] = 0.1

    def __init__(self, speed: int = 0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._speed = 0
        self._slice_start = 0.0
        self._slice_end = float("-inf")
        self._dispatched = 0
        self.set_speed(speed)

    @property
    def speed(self) -> int:
        """The limit in bytes per second (0: unlimited)."""
        return self._speed

    @property
    def _quota(self) -> float:
        return self._speed * self.SLICE

    def set_speed(self, speed: int) -> None:
        """Change the limit; accounting of the current slice is kept, measured anew."""
        if speed < 0:
            raise ValueError("speed must be non-negative")
        self._speed = speed
        if speed and self._dispatched:
            self._stretch()

    def delay_for(self, nbytes: int) -> float:
        """Seconds to wait before ``nbytes`` more may be sent (0.0: send now).

        ``nbytes`` does not change the answer (an overshoot is charged afterwards by
        stretching the slice); it is part of the call so callers state what they send.
        """
        del nbytes
        if not self._speed:
            return 0.0
        now = self._clock()
        if now >= self._slice_end or self._dispatched < self._quota:
            return 0.0
        return self._slice_end - now

    def charge(self, nbytes: int) -> None:
        """Account ``nbytes`` as sent now."""
        if not self._speed:
            return
        now = self._clock()
        if now >= self._slice_end:
            self._slice_start = now
            self._slice_end = now + self.SLICE
            self._dispatched = 0
        self._dispatched += nbytes
        if self._dispatched > self._quota:
            self._stretch()

    def _stretch(self) -> None:
        slices = max(1.0, self._dispatched / self._quota)
        self._slice_end = self._slice_start + slices * self.SLICE
