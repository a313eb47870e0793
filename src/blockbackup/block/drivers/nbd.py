"""``nbd``: a remote NBD export as a node, so backups can read from or write to it.

Options are QEMU's: ``server`` (a SocketAddress), ``export``, ``tls-creds``,
``tls-hostname``, ``reconnect-delay``. Requests are multiplexed over one
:class:`~blockbackup.nbd.client.NbdClient`; block status comes from ``base:allocation``.
With ``reconnect-delay`` > 0 a lost connection is re-established and requests issued in
the meantime wait up to that many seconds instead of failing at once.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

from blockbackup.block.driver import (
    BlockDriver,
    Extent,
    Limits,
    Status,
    WriteFlags,
    io_error,
    register,
)
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.errors import BlockBackupError
from blockbackup.nbd.client import NbdClient, NbdConnectError
from blockbackup.nbd.proto import AllocationState, TxFlag
from blockbackup.nbd.tls import TlsCredentials

T = TypeVar("T")


@register
class NbdDriver(BlockDriver):
    """Protocol driver over one NBD connection."""

    driver_name: ClassVar[str] = "nbd"

    def __init__(
        self,
        node: BlockNode,
        client: NbdClient,
        connect: Callable[[], Awaitable[NbdClient]],
        reconnect_delay: int,
    ) -> None:
        super().__init__(node)
        self.client = client
        self._connect = connect
        self._reconnect_delay = reconnect_delay
        self._reconnecting: asyncio.Task[NbdClient] | None = None
        self._size = client.size
        self.limits = Limits(request_alignment=client.min_block, max_transfer=client.max_block)

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> NbdDriver:
        server = opts.raw("server")
        if not isinstance(server, dict):
            raise BlockBackupError("Invalid parameter type for 'server', expected: object")
        export = opts.str("export", "")
        creds_id = opts.str("tls-creds", None)
        hostname = opts.str("tls-hostname", None)
        delay = opts.int("reconnect-delay", 0)
        opts.int("open-timeout", 0)
        creds: TlsCredentials | None = None
        if creds_id is not None:
            creds = opts.graph.objects.tls_credentials(creds_id, "client")

        async def connect() -> NbdClient:
            return await NbdClient.connect(server, export, tls=creds, tls_hostname=hostname)

        try:
            client = await connect()
        except NbdConnectError as exc:
            raise BlockBackupError(str(exc)) from exc
        return cls(node, client, connect, delay)

    @property
    def size(self) -> int:
        return self._size

    # -- connection management -------------------------------------------------------------

    async def _call(self, op: Callable[[NbdClient], Awaitable[T]]) -> T:
        """Run ``op`` on the current connection, reconnecting within ``reconnect-delay``."""
        deadline = time.monotonic() + self._reconnect_delay
        while True:
            client = self.client
            try:
                return await op(client)
            except OSError as exc:
                lost = client._error is not None
                if not lost or self._reconnect_delay <= 0 or time.monotonic() > deadline:
                    raise
                if exc.errno not in (errno.EIO, errno.ESHUTDOWN):
                    raise
            await self._reconnect(client, deadline)

    async def _reconnect(self, lost: NbdClient, deadline: float) -> None:
        if self.client is not lost:
            return
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._reconnect_loop(deadline))
        try:
            new = await asyncio.shield(self._reconnecting)
        except NbdConnectError as exc:
            raise io_error(errno.EIO, str(exc)) from exc
        if self.client is lost:
            self.client = new
            await lost.close()

    async def _reconnect_loop(self, deadline: float) -> NbdClient:
        while True:
            try:
                client = await self._connect()
            except NbdConnectError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            if client.size != self._size:
                await client.close()
                raise NbdConnectError("export size changed across reconnect")
            return client

    # -- I/O ---------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self._call(lambda c: c.read(offset, length))

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        fua = bool(flags & WriteFlags.FUA) and self.client.can(TxFlag.SEND_FUA)
        await self._call(lambda c: c.write(offset, data, fua=fua))

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        client = self.client
        if not client.can(TxFlag.SEND_WRITE_ZEROES):
            await super().write_zeroes(offset, length, flags)
            return
        fast = bool(flags & WriteFlags.NO_FALLBACK)
        if fast and not client.can(TxFlag.SEND_FAST_ZERO):
            raise io_error(errno.ENOTSUP)
        fua = bool(flags & WriteFlags.FUA) and client.can(TxFlag.SEND_FUA)
        may_trim = bool(flags & WriteFlags.MAY_UNMAP)
        await self._call(
            lambda c: c.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        )

    async def discard(self, offset: int, length: int) -> None:
        if self.client.can(TxFlag.SEND_TRIM):
            await self._call(lambda c: c.trim(offset, length))

    async def flush(self) -> None:
        if self.client.can(TxFlag.SEND_FLUSH):
            await self._call(lambda c: c.flush())

    async def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, 0xFFFFFFFF - 0xFFFF)
        extents = await self._call(lambda c: c.block_status(offset, length))
        if not extents:
            return Extent(offset, length, Status.DATA | Status.ALLOCATED)
        first_len, flags = extents[0]
        status = Status.ALLOCATED
        if flags & AllocationState.ZERO:
            status |= Status.ZERO
        if not flags & AllocationState.HOLE or not flags & AllocationState.ZERO:
            status |= Status.DATA
        return Extent(offset, min(first_len, length), status)

    async def close(self) -> None:
        if self._reconnecting is not None and not self._reconnecting.done():
            self._reconnecting.cancel()
        await self.client.close()
