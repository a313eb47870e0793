"""``copy-before-write``: the interception that keeps a point-in-time image.

The filter owns a :class:`~blockbackup.block.block_copy.BlockCopy` from its ``file``
(the source) to its ``target``, and registers a before-write hook on the source node's
request layer. Every modification of the source, by any path (this filter, an export made
before the backup, a parent node, the library API) therefore first copies the old
content of the clusters it touches, then proceeds. Reads pass straight through.

What a failed copy does is ``on-cbw-error``:

- ``break-guest-write`` (default): the guest write fails; the snapshot stays intact.
- ``break-snapshot``: the guest write goes on; the snapshot is marked broken (the backup
  job then fails with that error) and no further copies are made.

``x-cluster-size`` (a blockbackup extension for tests and experts) overrides QEMU's
cluster-size rule with an exact power of two, down to 512 bytes.

``cbw-timeout`` (seconds, 0 = none) bounds how long a guest write waits for its copy; a
timed-out copy counts as a failed one (ETIMEDOUT) and goes on in the background.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import ClassVar

from blockbackup.block.block_copy import BlockCopy, CopyError, backup_cluster_size
from blockbackup.block.driver import BlockDriver, Extent, Limits, WriteFlags, io_error, register
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.errors import BlockBackupError

log = logging.getLogger(__name__)

ON_CBW_ERROR = ("break-guest-write", "break-snapshot")


def _warn(message: str) -> None:
    log.warning("%s", message.removeprefix("warning: "))


@register
class CopyBeforeWriteDriver(BlockDriver):
    """Filter above a source: copies old data to the target before the source changes."""

    driver_name: ClassVar[str] = "copy-before-write"
    is_filter: ClassVar[bool] = True

    def __init__(
        self,
        node: BlockNode,
        source: BlockNode,
        target: BlockNode,
        cluster_size: int,
        on_cbw_error: str,
        timeout: float | None,
    ) -> None:
        super().__init__(node)
        self.source = source
        self.target = target
        self.on_cbw_error = on_cbw_error
        self.timeout = timeout
        self.snapshot_error: OSError | None = None
        #: Set when the snapshot breaks, so the job stops waiting for copies that are moot.
        self.broken = asyncio.Event()
        self.block_copy = BlockCopy(source, target, cluster_size)
        limits = source.limits
        self.limits = Limits(limits.request_alignment, limits.max_transfer, limits.cluster_size)
        source.add_before_write(self._before_write)
        target.write_blocker = (node.name, "target")

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> CopyBeforeWriteDriver:
        source = await opts.child("file")
        target = await opts.child("target")
        if opts.has("bitmap"):
            raise BlockBackupError("copy-before-write 'bitmap' is not supported yet")
        opts.raw("bitmap", None)
        on_cbw_error = opts.enum("on-cbw-error", ON_CBW_ERROR, "break-guest-write")
        timeout = opts.int("cbw-timeout", 0)
        if not 0 <= timeout <= 0xFFFFFFFF:
            raise BlockBackupError("Parameter 'cbw-timeout' expects uint32_t")
        min_cluster = opts.int("min-cluster-size", 0)
        if min_cluster and min_cluster & (min_cluster - 1):
            raise BlockBackupError("min-cluster-size needs to be a power of 2")
        exact_cluster = opts.int("x-cluster-size", 0)
        if exact_cluster and (exact_cluster < 512 or exact_cluster & (exact_cluster - 1)):
            raise BlockBackupError("x-cluster-size must be a power of 2 and at least 512")
        if source.size != target.size:
            raise BlockBackupError("Source and target image have different sizes")
        node.add_child("file", source)
        node.add_child("target", target)
        cluster = exact_cluster or backup_cluster_size(target, min_cluster, _warn)
        return cls(node, source, target, cluster, on_cbw_error, timeout or None)

    async def _before_write(self, offset: int, length: int) -> None:
        if self.snapshot_error is not None:
            return
        try:
            await self.block_copy.copy_before_write(offset, length, self.timeout)
        except CopyError as err:
            self._copy_failed(err.err)
        except TimeoutError:
            self._copy_failed(io_error(errno.ETIMEDOUT, "copy-before-write timed out"))

    def _copy_failed(self, err: OSError) -> None:
        if self.on_cbw_error == "break-guest-write":
            raise err
        log.warning("copy-before-write failed, snapshot broken: %s", err)
        self.snapshot_error = err
        self.broken.set()

    # -- pass-through ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.source.size

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self.source.read(offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        await self.source.write(offset, data, flags)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self.source.write_zeroes(offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self.source.discard(offset, length)

    async def flush(self) -> None:
        await self.source.flush()
        await self.target.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self.source.block_status(offset, length)

    async def close(self) -> None:
        self.source.remove_before_write(self._before_write)
        self.target.write_blocker = None
        await self.block_copy.aclose()
