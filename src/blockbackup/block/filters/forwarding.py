"""The base of every filter driver: forward to one child whatever the filter does not change.

Why a base class: a filter adds one behaviour (a limit, an interception, fault injection)
to a child's I/O. Written by hand, each filter forwarded some operations and forgot others
(a ``throttle`` node refused ``truncate`` and never forwarded ``drop_cache`` or
``early_writeback``), and every operation forgotten is a behaviour of the child that
vanishes behind the filter. Here each operation is forwarded once; a filter overrides only
what it changes.

Two kinds of operation are *not* forwarded blindly, because forwarding them would skip
the filter itself:

- The inline twins (``read_now``, ``write_now``): a request completed inline never comes
  through the filter's awaited ``read`` / ``write``. They are forwarded only by a filter
  that does not change ``read`` (resp. ``write``); a filter that does declines them
  (``None`` / ``False``, so the request takes the awaited path) unless it overrides the
  twin too, saying when it can let a request through at once.
- ``fd_map``: copy offload goes straight to the child's file, past the filter and past
  the request layer of the child node (its before-write hooks, dirty trackers): always
  ``None`` here.

``can_compress`` is not forwarded either: as in QEMU, a compressed backup needs a target
whose own driver writes compressed clusters.
"""

from __future__ import annotations

from typing import ClassVar

from blockbackup.block.driver import BlockDriver, Extent, Limits, WriteFlags
from blockbackup.block.node import BlockNode

Buffer = bytes | bytearray | memoryview


def child_limits(child: BlockNode) -> Limits:
    """The limits a filter takes from its child (what the child can take, it can)."""
    limits = child.limits
    return Limits(limits.request_alignment, limits.max_transfer, limits.cluster_size)


class FilterDriver(BlockDriver):
    """A driver over one child, ``child``, forwarding every operation it does not override."""

    is_filter: ClassVar[bool] = True
    #: Whether ``read_now`` / ``write_now`` are forwarded: set per subclass, True when it
    #: changes neither the awaited operation nor the twin (see the module docstring).
    _forward_read_now: ClassVar[bool] = True
    _forward_write_now: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._forward_read_now = cls.read is FilterDriver.read
        cls._forward_write_now = cls.write is FilterDriver.write

    def __init__(self, node: BlockNode, child: BlockNode, limits: Limits | None = None) -> None:
        super().__init__(node)
        self.child = child
        self.limits = child_limits(child) if limits is None else limits

    @property
    def size(self) -> int:
        return self.child.size

    async def read(self, offset: int, length: int) -> Buffer:
        return await self.child.read(offset, length)

    async def write(self, offset: int, data: Buffer, flags: WriteFlags) -> None:
        await self.child.write(offset, data, flags)

    def read_now(self, offset: int, length: int, into: memoryview | None = None) -> Buffer | None:
        if not self._forward_read_now:
            return None
        return self.child.read_now(offset, length, into)

    def write_now(self, offset: int, data: Buffer, flags: WriteFlags) -> bool:
        if not self._forward_write_now:
            return False
        return self.child.write_now(offset, data, flags)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self.child.write_zeroes(offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self.child.discard(offset, length)

    async def truncate(self, size: int) -> None:
        await self.child.truncate(size)

    async def flush(self) -> None:
        await self.child.flush()

    async def drop_cache(self, offset: int, length: int) -> None:
        await self.child.drop_cache(offset, length)

    def early_writeback(self) -> bool:
        return self.child.early_writeback()

    async def block_status(self, offset: int, length: int) -> Extent:
        extent = await self.child.block_status(offset, length)
        return Extent(offset, extent.length, extent.status)

    def fd_map(self, offset: int) -> tuple[int, int] | None:
        return None  # copy offload would pass by the filter: see the module docstring
