"""The base of every filter driver: forward to one child whatever the filter does not change.

Why a base class: a filter adds one behaviour (a limit, an interception, fault injection)
to a child's I/O. Written by hand, each filter forwarded some operations and forgot others
(a ``throttle`` node refused ``truncate`` and never forwarded ``drop_cache`` or
``early_writeback``), and every operation forgotten is a behaviour of the child that
vanishes behind the filter. Here each operation is forwarded once; a filter overrides only
what it changes.

Two kinds of operation are *not* forwarded blindly, because forwarding them would skip
the filter itself:

- Reads and writes: each is one call (``submit_read`` / ``submit_write``) that completes
  at once or returns what must be awaited, and ``read`` / ``write`` await that same call,
  so a filter that changes one changes both paths. Forwarded only by a filter that does
  not change the request: one that overrides only the awaited ``read`` (resp. ``write``)
  gets the driver default, which always awaits it, so nothing completes past it; to
  let requests through at once it overrides ``submit_*`` instead.
- ``fd_map``: copy offload goes straight to the child's file, past the filter and past
  the request layer of the child node (its before-write hooks, dirty trackers): always
  ``None`` here.

``can_compress`` is not forwarded either: as in QEMU, a compressed backup needs a target
whose own driver writes compressed clusters.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, ClassVar

from blockbackup.block.driver import BlockDriver, Buffer, Extent, Limits, WriteFlags
from blockbackup.block.node import BlockNode

__all__ = ["Buffer", "FilterDriver", "child_limits"]


def child_limits(child: BlockNode) -> Limits:
    """The limits a filter takes from its child (what the child can take, it can)."""
    limits = child.limits
    return Limits(limits.request_alignment, limits.max_transfer, limits.cluster_size)


class FilterDriver(BlockDriver):
    """A driver over one child, ``child``, forwarding every operation it does not override."""

    is_filter: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # A filter that changes only the awaited read (write) must not be forwarded past
        # inline: its submit_* await its own read (write), as for any driver.
        if cls.read is not BlockDriver.read and cls.submit_read is FilterDriver.submit_read:
            cls.submit_read = BlockDriver.submit_read  # type: ignore[method-assign]
        if cls.write is not BlockDriver.write and cls.submit_write is FilterDriver.submit_write:
            cls.submit_write = BlockDriver.submit_write  # type: ignore[method-assign]

    def __init__(self, node: BlockNode, child: BlockNode, limits: Limits | None = None) -> None:
        super().__init__(node)
        self.child = child
        self.limits = child_limits(child) if limits is None else limits

    @property
    def size(self) -> int:
        return self.child.size

    def submit_read(
        self, offset: int, length: int, into: memoryview | None = None
    ) -> Buffer | Coroutine[Any, Any, Buffer]:
        return self.child.submit_read(offset, length, into)

    def submit_write(
        self, offset: int, data: Buffer, flags: WriteFlags
    ) -> Coroutine[Any, Any, None] | None:
        return self.child.submit_write(offset, data, flags)

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
