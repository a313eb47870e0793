"""``throttle``: a filter that slows the I/O going through it to a group's limits.

Why so thin: the policy (leaky buckets, bursts, fairness, the clock) belongs to the
``throttle-group`` object in :mod:`blockbackup.block.throttle_groups`, shared by every
member node. The filter only asks the group when a request may start, then forwards it
to ``file``. Reads count as reads; writes, write-zeroes and discards count as writes (as
in QEMU); everything else (flush, block status, truncate, cache hints) is forwarded by
:class:`~blockbackup.block.filters.forwarding.FilterDriver` unthrottled.

A quiesced node does not wait for its limits (QEMU disables throttling while draining), so
a tiny limit can never hold a backup's point in time, or a graph change, for long.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, ClassVar

from blockbackup.block.driver import BUFFER_TYPES, WriteFlags, register
from blockbackup.block.filters.forwarding import Buffer, FilterDriver
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import ChildRole
from blockbackup.block.throttle_groups import ThrottleGroup
from blockbackup.errors import BlockBackupError


@register
class ThrottleDriver(FilterDriver):
    """Waits for the group's go-ahead, then forwards to ``file``; forwards the rest as is.

    A read or write is one call (``submit_read`` / ``submit_write``): with limits it is
    always the awaited request that waits here; without any limit the child decides
    whether it completes at once, as there is nothing to wait for.
    """

    driver_name: ClassVar[str] = "throttle"

    def __init__(self, node: BlockNode, child: BlockNode, group: ThrottleGroup) -> None:
        super().__init__(node, child)
        self.group = group
        group.members += 1
        self._closed = False
        #: Bytes this node admitted and passed on, reads and writes (write-zeroes and
        #: discards count as writes): what went through the limits, for tests and stats.
        self.admitted_read = 0
        self.admitted_write = 0

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> ThrottleDriver:
        name = opts.str("throttle-group")
        group = opts.graph.objects.throttle_group(name)
        if group is None:
            raise BlockBackupError(f"Throttle group '{name}' does not exist")
        child = await opts.child("file")
        node.add_child("file", child, ChildRole.FILTERED | ChildRole.PRIMARY)
        return cls(node, child, group)

    def _quiesced(self) -> bool:
        # A quiesced node is being drained: its requests must not wait for the limits.
        return self.node.is_quiesced

    async def _admit(self, is_write: bool, size: int) -> None:
        await self.group.wait(is_write, size, self._quiesced)
        if is_write:
            self.admitted_write += size
        else:
            self.admitted_read += size

    def submit_read(
        self, offset: int, length: int, into: memoryview | None = None
    ) -> Buffer | Coroutine[Any, Any, Buffer]:
        if not self.group.enabled:  # no limit: nothing to wait for, the child decides
            data = self.child.submit_read(offset, length, into)
            if isinstance(data, BUFFER_TYPES):
                self.admitted_read += length
                return data
            data.close()  # holds nothing until run; the awaited read below asks again
        return self._read(offset, length)

    async def _read(self, offset: int, length: int) -> Buffer:
        await self._admit(False, length)
        return await self.child.read(offset, length)

    def submit_write(
        self, offset: int, data: Buffer, flags: WriteFlags
    ) -> Coroutine[Any, Any, None] | None:
        if not self.group.enabled:  # no limit: nothing to wait for, the child decides
            pending = self.child.submit_write(offset, data, flags)
            if pending is None:
                self.admitted_write += len(data)
                return None
            pending.close()  # holds nothing until run; the awaited write below asks again
        return self._write(offset, data, flags)

    async def _write(self, offset: int, data: Buffer, flags: WriteFlags) -> None:
        await self._admit(True, len(data))
        await self.child.write(offset, data, flags)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._admit(True, length)
        await self.child.write_zeroes(offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self._admit(True, length)
        await self.child.discard(offset, length)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.group.members -= 1
