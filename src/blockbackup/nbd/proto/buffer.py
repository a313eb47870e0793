"""Receive buffer with a hard size cap and a skip counter.

Why: the peer decides how many bytes arrive, so the buffer refuses to grow
past ``cap`` (a denial-of-service bound) and can drop a known number of
future bytes (an oversized WRITE payload) without ever storing them.
Parsers read fixed headers in place with ``unpack_from``; nothing rescans.
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import RemoteProtocolError
from .wire import Buffer


class ReceiveBuffer:
    """Bytes received but not yet parsed."""

    __slots__ = ("_cap", "_data", "_skip", "eof", "high_water")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._data = bytearray()
        self._skip = 0
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

    def feed(self, data: Buffer) -> None:
        """Append ``data`` (after dropping any pending skip)."""
        view = memoryview(data).cast("B")
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
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
