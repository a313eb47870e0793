"""In-flight byte-range requests, and waiting for overlapping ones to finish.

block-copy registers each chunk it is copying so that a concurrent copy of an overlapping
range (a guest write through copy-before-write racing the background copy) waits instead of
copying the same clusters twice; the request layer uses the same list to serialise
overlapping requests.  This is QEMU's ``block/reqlist.c`` in asyncio form.

No I/O happens here.  The list is owned by one event loop and is not thread-safe.

Contract:

* :meth:`ReqList.add` registers a range without checking conflicts; callers that need
  exclusion call :meth:`ReqList.wait_conflicts` first and add *without awaiting in between*.
* :meth:`ReqList.remove` finishes a request and wakes everything waiting on it.
* :meth:`ReqList.shrink` gives back the tail of a request (block-copy found the tail clean)
  and wakes waiters so they re-check; :meth:`Request.wait` keeps waiting until removal.
* Waiting holds nothing, and cancelling a waiter leaves the list untouched.

A linear scan is used: in practice there are at most about a hundred requests in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

__all__ = ["ReqList", "Request"]


class Request:
    """One in-flight range ``[offset, offset + length)``; created by :meth:`ReqList.add`."""

    __slots__ = ("_changed", "_done", "_length", "_offset")

    def __init__(self, offset: int, length: int) -> None:
        self._offset = offset
        self._length = length
        self._done = False
        # Set (then dropped) whenever the request shrinks or finishes; created on demand
        # so requests nobody waits for never allocate an Event.
        self._changed: asyncio.Event | None = None

    @property
    def offset(self) -> int:
        """First byte of the range."""
        return self._offset

    @property
    def length(self) -> int:
        """Length of the range in bytes."""
        return self._length

    @property
    def end(self) -> int:
        """One past the last byte of the range."""
        return self._offset + self._length

    @property
    def done(self) -> bool:
        """Whether the request has been removed from its list."""
        return self._done

    def overlaps(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` shares a byte with this request.

        Empty ranges share no byte with anything.
        """
        return (
            length > 0
            and self._length > 0
            and offset < self._offset + self._length
            and self._offset < offset + length
        )

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_changed(self) -> None:
        """Return after the next shrink or removal (at once if already removed)."""
        if self._done:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    async def wait(self) -> None:
        """Return once the request has been removed (finished)."""
        while not self._done:
            await self._wait_changed()

    def __repr__(self) -> str:
        state = "done" if self._done else "in flight"
        return f"Request(offset={self._offset}, length={self._length}, {state})"


class ReqList:
    """The requests currently in flight over one node or copy state."""

    __slots__ = ("_bytes", "_reqs")

    def __init__(self) -> None:
        self._reqs: list[Request] = []
        self._bytes = 0

    def add(self, offset: int, length: int) -> Request:
        """Register ``[offset, offset + length)`` as in flight; conflicts are not checked.

        A zero-length request never conflicts with anything.

        :raise ValueError: if ``offset`` or ``length`` is negative.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid request range: offset={offset} length={length}")
        req = Request(offset, length)
        self._reqs.append(req)
        self._bytes += length
        return req

    def find_conflict(self, offset: int, length: int) -> Request | None:
        """The oldest in-flight request overlapping ``[offset, offset + length)``, if any."""
        for req in self._reqs:
            if req.overlaps(offset, length):
                return req
        return None

    async def wait_conflicts(self, offset: int, length: int) -> None:
        """Wait until no in-flight request overlaps ``[offset, offset + length)``.

        On return the range is free *now*; add your own request before awaiting anything
        else if you need it to stay free.
        """
        while (req := self.find_conflict(offset, length)) is not None:
            await req._wait_changed()

    def _index(self, req: Request) -> int:
        for i, r in enumerate(self._reqs):
            if r is req:
                return i
        raise ValueError(f"{req!r} is not in this list")

    def remove(self, req: Request) -> None:
        """Finish ``req`` and wake everything waiting on it.

        :raise ValueError: if ``req`` is not in this list (for example removed twice).
        """
        del self._reqs[self._index(req)]
        self._bytes -= req._length
        req._done = True
        req._notify()

    def shrink(self, req: Request, new_length: int) -> None:
        """Drop the tail of ``req`` so it ends at ``offset + new_length``; wake its waiters.

        :raise ValueError: unless ``0 < new_length <= req.length`` and ``req`` is in this
            list.
        """
        self._index(req)
        if not 0 < new_length <= req._length:
            raise ValueError(f"cannot shrink {req!r} to {new_length} bytes")
        if new_length == req._length:
            return
        self._bytes -= req._length - new_length
        req._length = new_length
        req._notify()

    @property
    def bytes_in_flight(self) -> int:
        """Sum of the lengths of the requests in flight."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._reqs)

    def __iter__(self) -> Iterator[Request]:
        """Iterate over a snapshot, oldest first (safe against concurrent removal)."""
        return iter(tuple(self._reqs))

    def __repr__(self) -> str:
        return f"ReqList({len(self._reqs)} requests, {self._bytes} bytes in flight)"
