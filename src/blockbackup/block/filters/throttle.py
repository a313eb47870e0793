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

from typing import ClassVar

from blockbackup.block.driver import WriteFlags, register
from blockbackup.block.filters.forwarding import Buffer, FilterDriver
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import ChildRole
from blockbackup.block.throttle_groups import ThrottleGroup
from blockbackup.errors import BlockBackupError


@register
class ThrottleDriver(FilterDriver):
    """Waits for the group's go-ahead, then forwards to ``file``; forwards the rest as is.

    Requests completed inline (``read_now`` / ``write_now``) would not wait: with limits
    the node declines them (the request takes the awaited path and waits here); without
    any limit it forwards them, as it has nothing to wait for.
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

    async def read(self, offset: int, length: int) -> Buffer:
        await self._admit(False, length)
        return await self.child.read(offset, length)

    async def write(self, offset: int, data: Buffer, flags: WriteFlags) -> None:
        await self._admit(True, len(data))
        await self.child.write(offset, data, flags)

    def read_now(self, offset: int, length: int, into: memoryview | None = None) -> Buffer | None:
        if self.group.enabled:
            return None
        data = self.child.read_now(offset, length, into)
        if data is not None:
            self.admitted_read += length
        return data

    def write_now(self, offset: int, data: Buffer, flags: WriteFlags) -> bool:
        if self.group.enabled or not self.child.write_now(offset, data, flags):
            return False
        self.admitted_write += len(data)
        return True

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
