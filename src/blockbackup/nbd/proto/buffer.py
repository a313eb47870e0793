"""Receive buffer with a hard size cap, a skip counter and a payload sink.

Why: the peer decides how many bytes arrive, so the buffer refuses to grow
past ``cap`` (a denial-of-service bound) and can drop a known number of
future bytes (an oversized WRITE payload) without ever storing them.
Parsers read fixed headers in place with ``unpack_from``; nothing rescans.
A parser that knows a payload's (already bounded) size can open a *sink*: a
buffer of exactly that size that the following bytes fill before anything
else is buffered. The I/O layer may receive straight into ``sink_view()``,
so a large WRITE payload is copied once, from the socket into its final buffer.
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import RemoteProtocolError
from .wire import Buffer

#: A sink starts this large (or as large as its payload; as much as a peer may have us
#: buffer anyway) and grows ``SINK_GROWTH`` times over when full, so what a payload
#: commits stays within max(SINK_START, SINK_GROWTH x what the peer sent).
SINK_START = 1024 * 1024
SINK_GROWTH = 4


class ReceiveBuffer:
    """Bytes received but not yet parsed."""

    __slots__ = (
        "_cap",
        "_data",
        "_sink",
        "_sink_fill",
        "_sink_size",
        "_skip",
        "eof",
        "high_water",
    )

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._data = bytearray()
        self._skip = 0
        self._sink: bytearray | None = None
        self._sink_fill = 0
        self._sink_size = 0
        self.eof = False
        #: Largest size ever buffered (tests assert it never exceeds ``cap``).
        self.high_water = 0

    @property
    def cap(self) -> int:
        return self._cap

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    @property
    def skipping(self) -> int:
        """How many future bytes will still be dropped on arrival."""
        return self._skip

    @property
    def sink_pending(self) -> int:
        """Bytes the open sink still waits for (0 when none is open or it is full)."""
        return 0 if self._sink is None else self._sink_size - self._sink_fill

    def open_sink(self, size: int) -> None:
        """Collect the next ``size`` bytes (buffered ones first) in a buffer of their own.

        The caller bounds ``size`` before calling. The buffer starts at ``SINK_START``
        and grows as it fills: a peer that sends a header and stops commits us to
        little memory, not to the whole announced payload.
        """
        if self._sink is not None or self._skip:
            raise RuntimeError("a sink or skip is already pending")
        n = min(size, len(self._data))
        sink = bytearray(max(n, min(size, SINK_START)))
        if n:
            with memoryview(self._data) as src:
                sink[:n] = src[:n]
            del self._data[:n]
        self._sink = sink
        self._sink_fill = n
        self._sink_size = size

    def _sink_room(self) -> bytearray | None:
        """The open, unfinished sink, grown if it is full (None if there is none)."""
        sink = self._sink
        if sink is None or self._sink_fill == self._sink_size:
            return None
        if self._sink_fill == len(sink):
            grow = min(self._sink_size, SINK_GROWTH * len(sink)) - len(sink)
            try:
                sink += bytes(grow)
            except BufferError:  # someone still holds a view of it: grow a copy
                sink = self._sink = sink + bytes(grow)
        return sink

    def sink_view(self) -> memoryview | None:
        """Where the next received bytes may be written directly, if a sink waits for them.

        After writing ``n`` bytes there, call :meth:`sink_filled` before anything else,
        and drop the view before the next call (the sink may have to grow).
        """
        sink = self._sink_room()
        if sink is None:
            return None
        return memoryview(sink)[self._sink_fill :]

    def sink_filled(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`sink_view`."""
        room = 0 if self._sink is None else len(self._sink) - self._sink_fill
        if not 0 <= n <= room:
            raise RuntimeError(f"sink_filled({n}) with room for {room} bytes")
        self._sink_fill += n

    def take_sink(self) -> bytearray | None:
        """The sink's buffer once it is full (the sink is closed), else None."""
        sink = self._sink
        if sink is None or self._sink_fill != self._sink_size:
            return None
        self._sink = None
        self._sink_fill = 0
        self._sink_size = 0
        return sink

    def feed(self, data: Buffer) -> None:
        """Append ``data`` (after dropping any pending skip and filling any open sink)."""
        view = memoryview(data).cast("B")
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        while view and self.sink_pending:
            sink = self._sink_room()
            assert sink is not None
            n = min(len(sink) - self._sink_fill, len(view))
            sink[self._sink_fill : self._sink_fill + n] = view[:n]
            self._sink_fill += n
            view = view[n:]
        if not view:
            return
        if len(self._data) + len(view) > self._cap:
            raise RemoteProtocolError(
                f"peer sent more than {self._cap} unparsed bytes; refusing to buffer"
            )
        self._data += view
        self.high_water = max(self.high_water, len(self._data))

    def unpack_from(self, layout: struct.Struct, offset: int = 0) -> tuple[Any, ...]:
        """Decode a fixed header in place; the caller checked the length."""
        return layout.unpack_from(self._data, offset)

    def consume(self, n: int) -> bytes:
        """Remove and return the first ``n`` bytes."""
        with memoryview(self._data) as view:
            out = bytes(view[:n])
        del self._data[:n]
        return out

    def copy_into(self, dest: bytearray | memoryview, start: int, n: int, offset: int = 0) -> None:
        """Copy ``n`` buffered bytes from ``offset`` into ``dest[start:]`` (no consume)."""
        with memoryview(self._data) as src, memoryview(dest).cast("B") as dst:
            dst[start : start + n] = src[offset : offset + n]

    def drop(self, n: int) -> None:
        """Discard ``n`` bytes: what is buffered now, the rest as it arrives."""
        now = min(n, len(self._data))
        del self._data[:now]
        self._skip += n - now
