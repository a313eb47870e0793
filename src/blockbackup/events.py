"""The event bus: one place where QMP events are stamped and fanned out.

Events are plain JSON-ready dicts shaped exactly like QMP's wire form::

    {"timestamp": {"seconds": S, "microseconds": U}, "event": NAME, "data": {...}}

(``data`` is omitted when the event has none). Delivery is synchronous and in emit order,
into an unbounded buffer per subscriber, so an emitter never waits for a slow listener and
two subscribers always see the same order. QMP monitor sessions and tests subscribe with
``with bus.subscribe() as sub: ...`` and read with ``await sub.get()`` or ``sub.drain()``.
Delivered dicts are shared between subscribers: treat them as read-only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

Event = dict[str, Any]


class EventSubscription:
    """An unbounded, ordered buffer of the events emitted while it is subscribed.

    Use it as a context manager; leaving the block (or :meth:`close`) unsubscribes.
    """

    def __init__(self, bus: EventBus, names: frozenset[str] | None) -> None:
        self._bus = bus
        self._names = names
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._closed = False

    def _deliver(self, event: Event) -> None:
        if self._names is None or event["event"] in self._names:
            self._queue.put_nowait(event)

    @property
    def closed(self) -> bool:
        """Whether this subscription no longer receives events."""
        return self._closed

    async def get(self) -> Event:
        """Wait for and return the next event."""
        return await self._queue.get()

    def get_nowait(self) -> Event:
        """Return the next buffered event; raise ``asyncio.QueueEmpty`` if there is none."""
        return self._queue.get_nowait()

    def drain(self) -> list[Event]:
        """Return (and remove) every buffered event, oldest first."""
        out: list[Event] = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    def close(self) -> None:
        """Stop receiving events; already buffered events stay readable."""
        if not self._closed:
            self._closed = True
            self._bus._unsubscribe(self)

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventBus:
    """Stamps events with the host wall clock and delivers them to every subscriber.

    :param clock: returns the wall clock in nanoseconds (``time.time_ns``); injectable
        so tests get deterministic timestamps.
    """

    def __init__(self, *, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._subscribers: list[EventSubscription] = []

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Stamp one event and deliver it to every subscriber before returning."""
        now_ns = self._clock()
        event: Event = {
            "timestamp": {
                "seconds": now_ns // 1_000_000_000,
                "microseconds": (now_ns // 1_000) % 1_000_000,
            },
            "event": name,
        }
        if data is not None:
            event["data"] = data
        for sub in list(self._subscribers):
            sub._deliver(event)

    def subscribe(self, names: Iterable[str] | None = None) -> EventSubscription:
        """Start buffering events (only those named in ``names``, when given)."""
        sub = EventSubscription(self, None if names is None else frozenset(names))
        self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: EventSubscription) -> None:
        self._subscribers.remove(sub)
