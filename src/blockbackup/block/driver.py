"""The driver interface: what every format, protocol and filter implements.

A :class:`BlockDriver` does the I/O of one node and nothing else. Bounds checks, alignment,
splitting to the transfer limit, in-flight tracking, quiescing, before-write interception
and dirty tracking are done once, for every driver, by the request layer in
:mod:`blockbackup.block.node`. A driver may therefore assume every request it gets is in
bounds, aligned to its ``request_alignment`` and no longer than its ``max_transfer``.

Drivers are created only from ``blockdev-add`` option dicts, through
:meth:`BlockDriver.open`, so the command line, QMP and the Python API share one path.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from blockbackup._aio import inline_may_skip_yield

if TYPE_CHECKING:
    from blockbackup.block.copy_range import Reader
    from blockbackup.block.node import BlockNode
    from blockbackup.block.options import Options
    from blockbackup.block.permissions import Perm


Buffer = bytes | bytearray | memoryview
#: For ``isinstance``: a tuple, not the union (which is built anew at every evaluation).
BUFFER_TYPES = (bytes, bytearray, memoryview)


class WriteFlags(enum.IntFlag):
    """Flags of write and write-zeroes requests (QEMU's BDRV_REQ_* that matter here)."""

    NONE = 0
    FUA = 1  # the data is on stable storage when the request completes
    MAY_UNMAP = 2  # write-zeroes may deallocate (punch a hole)
    NO_FALLBACK = 4  # write-zeroes must be fast: fail with ENOTSUP rather than write buffers
    COMPRESSED = 8  # compressed cluster write (formats that support it)


class Status(enum.IntFlag):
    """Block status of an extent."""

    NONE = 0
    DATA = 1  # reads return data stored in some layer
    ZERO = 2  # reads return zeroes
    ALLOCATED = 4  # this node's layer (not a backing file) decides the content


@dataclass(frozen=True, slots=True)
class Extent:
    """A range with one status. ``offset`` is where it starts, relative to the node."""

    offset: int
    length: int
    status: Status

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_zero(self) -> bool:
        return bool(self.status & Status.ZERO)

    @property
    def is_allocated(self) -> bool:
        return bool(self.status & Status.ALLOCATED)


@dataclass(frozen=True, slots=True)
class Limits:
    """What requests a driver can take. The request layer adapts requests to these."""

    request_alignment: int = 1
    max_transfer: int = 0  # 0: no limit
    cluster_size: int | None = None  # None: the driver has no cluster information


def io_error(code: int, detail: str | None = None) -> OSError:
    """An OSError with an errno and its standard text; ``detail`` goes into a note."""
    err = OSError(code, os.strerror(code))  # strerror stays the standard text users see
    if detail:
        err.add_note(detail)
    return err


class PartialWrite(OSError):
    """A ``write_many`` whose piece ``written`` failed: the pieces before it are written.

    The failed piece's errno and text, so error policies and messages see the same error
    as from a single write; the count lets a copy keep the pieces that made it.
    """

    written = 0

    @classmethod
    def after(cls, err: OSError, written: int) -> PartialWrite:
        partial = cls(err.errno, err.strerror)
        partial.written = written
        for note in getattr(err, "__notes__", ()):
            partial.add_note(note)
        return partial


async def write_each(
    write: Callable[[int, memoryview, WriteFlags], Awaitable[None]],
    pieces: Sequence[tuple[int, memoryview]],
    flags: WriteFlags,
) -> None:
    """``write`` each piece in turn; a failure is a :class:`PartialWrite` counting the
    pieces written before it."""
    for n, (offset, data) in enumerate(pieces):
        try:
            await write(offset, data, flags)
        except OSError as err:
            raise PartialWrite.after(err, n) from err


class BlockDriver(ABC):
    """One node's I/O. Subclasses set ``driver_name`` and register with :func:`register`.

    Contract:
    - ``open`` parses the driver's options (taking its children through ``opts.child``)
      and returns a ready driver; errors are :class:`blockbackup.errors.BlockBackupError`
      with QEMU's texts.
    - I/O methods raise ``OSError`` with an errno on failure; nothing else.
    - ``size`` does not change while the node is open, except through :meth:`truncate`.
    """

    driver_name: ClassVar[str]
    #: True for filters that pass data through to one child (``filtered_role``).
    is_filter: ClassVar[bool] = False
    #: The child a filter passes data through to (QEMU calls blkdebug's "image").
    filtered_role: ClassVar[str] = "file"
    limits: Limits = Limits()

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    @classmethod
    @abstractmethod
    async def open(cls, node: BlockNode, opts: Options) -> BlockDriver:
        """Create the driver for ``node`` from its blockdev-add options."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    # Each data request has one function, ``submit_read`` / ``submit_write``, with the
    # shape of the node's admission (:meth:`BlockNode.submit_read`): it completes the
    # request at once (a page-cache copy on the loop thread) or returns the coroutine
    # that completes it, so what a request must pass (bounds of a window, the page-cache
    # decision, a filter's limit) is written once for both. A returned coroutine has done
    # nothing visible and holds nothing until it runs: the caller may close it unrun and
    # ask again later (the node does, when its own admission must be redone). It must not
    # capture another unstarted coroutine (closing it would leave that one unawaited).
    #
    # ``read`` / ``write`` are the same request awaited. A driver whose requests always
    # wait (qcow2, nbd) implements those two and inherits ``submit_*``, which return them;
    # a driver that can complete at once implements ``submit_*`` and inherits these.
    # :func:`register` refuses a driver that implements neither.

    def submit_read(
        self, offset: int, length: int, into: memoryview | None = None
    ) -> Buffer | Coroutine[Any, Any, Buffer]:
        """Exactly ``length`` bytes at ``offset``: the data now, or the coroutine giving it.

        ``into``: a writable buffer of ``length`` bytes to read into when reading at once
        (and return), so that a caller copying many pieces reuses one buffer. Errors of an
        inline read raise here. The default: always awaited (:meth:`read`).
        """
        return self.read(offset, length)

    async def read(self, offset: int, length: int) -> Buffer:
        """Exactly ``length`` bytes at ``offset`` (:meth:`submit_read`, awaited)."""
        data = self.submit_read(offset, length)
        if isinstance(data, BUFFER_TYPES):
            # Done at once: yield as a pool call would, so that a caller looping on
            # reads cannot starve the loop.
            if not inline_may_skip_yield():
                await asyncio.sleep(0)
            return data
        return await data

    def submit_write(
        self, offset: int, data: Buffer, flags: WriteFlags
    ) -> Coroutine[Any, Any, None] | None:
        """Write ``data``: None when written now, else the coroutine that writes it.

        Errors of an inline write raise here. The default: always awaited (:meth:`write`).
        """
        return self.write(offset, data, flags)

    async def write(self, offset: int, data: Buffer, flags: WriteFlags) -> None:
        """Write ``data`` (:meth:`submit_write`, awaited)."""
        pending = self.submit_write(offset, data, flags)
        if pending is not None:
            await pending
        elif not inline_may_skip_yield():
            # Yield once, as a pool call would: a caller looping on writes must not
            # starve the loop (QMP, other clients, a backup taking its point in time).
            await asyncio.sleep(0)

    async def write_many(self, pieces: list[tuple[int, memoryview]], flags: WriteFlags) -> None:
        """Write several pieces (:meth:`BlockNode.write_many`), raising :class:`PartialWrite`
        (or any ``OSError``: none known written) for a failure. The default writes one at a
        time; a driver whose every write costs a thread round trip writes them in one."""
        await write_each(self.write, pieces, flags)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        """Make the range read as zeroes. The default writes zero buffers."""
        if flags & WriteFlags.NO_FALLBACK:
            raise io_error(errno.ENOTSUP)
        chunk = min(length, 1 << 20)
        zeroes = bytes(chunk)
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            await self.write(offset, memoryview(zeroes)[:n], flags & WriteFlags.FUA)
            offset += n

    async def discard(self, offset: int, length: int) -> None:
        """Advisory deallocation; the default does nothing."""

    async def truncate(self, size: int) -> None:
        """Change the node's size to ``size`` bytes; ``size`` reflects it afterwards.

        Growing makes the new range read as zeroes. Image formats use it to grow their
        file as they allocate. The default refuses: most nodes have a fixed size.
        """
        raise io_error(errno.ENOTSUP, f"driver {self.driver_name} cannot change its size")

    async def flush(self) -> None:
        """Make completed writes durable. The default has nothing to flush."""

    async def drop_cache(self, offset: int, length: int) -> None:
        """Hint: nobody reads the range again soon; write back and evict what the host
        caches of it. Advisory: never fails. The default has no cache to drop."""

    def early_writeback(self) -> bool:
        """Whether writing back cached writes before the flush suits this node (a copy
        starting writeback as it goes, :meth:`drop_cache`): a buffered file whose flushes
        count. The default: no host cache to write back."""
        return False

    async def block_status(self, offset: int, length: int) -> Extent:
        """Status of the extent starting at ``offset`` (at most ``length`` long).

        The default says "allocated data" for the whole range.
        """
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    def fd_map(self, offset: int) -> tuple[int, int] | None:
        """The local file descriptor and file offset holding byte ``offset`` verbatim, if any.

        Used for ``copy_file_range`` between local files; ``None`` means "not a plain file".
        """
        return None

    def reader(self, offset: int) -> tuple[Reader, int] | None:
        """What fills a copy's buffer from byte ``offset`` on in the copying thread, by
        itself, and the offset to ask it for, when this node is not a plain file (those go
        by :meth:`fd_map`). A copy into a local file then costs one thread call per chunk
        (:func:`~blockbackup.block.copy_range.copy_through_buffer`). The default: none.
        """
        return None

    def pulls(self) -> bool:
        """Whether this node, as a copy's target, reads the source itself (:meth:`pull`).
        The default: no."""
        return False

    def pull(self, reader: Reader, src_off: int, offset: int, length: int) -> bool:
        """Blocking (run in a thread): write at ``offset`` the ``length`` bytes ``reader``
        has at ``src_off``, reading them where they are needed; False when it cannot
        (nothing written: the copy reads and writes as usual). A failed read raises
        :class:`~blockbackup.block.copy_range.SourceReadError`, a failed write the plain
        ``OSError``.

        Why: a repository target reads a backup's chunks straight into its encoder
        processes' memory, in one thread call per chunk of the copy, where a read and a
        write cost two thread calls, a fresh buffer and a copy of every byte."""
        return False

    def can_compress(self) -> bool:
        """Whether ``WriteFlags.COMPRESSED`` writes are supported."""
        return False

    # -- permissions (see blockbackup.block.permissions) ------------------------------------

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Get ready for the node to be used with ``perm`` taken and only ``shared``
        shared, or raise :class:`~blockbackup.errors.BlockBackupError` having changed
        nothing. :meth:`set_perm` or :meth:`abort_perm` follows. The default: nothing
        outside this process can object (the ``file`` driver takes locks)."""

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Settle on the use last checked (drop what it no longer needs). Never raises."""

    def abort_perm(self) -> None:
        """Go back to the use before the last :meth:`check_perm`. Never raises."""

    async def close(self) -> None:
        """Release resources; the node's children are closed by the graph."""


DRIVERS: dict[str, type[BlockDriver]] = {}


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    """Class decorator: make a driver constructible by its ``driver_name``."""
    for kind in ("read", "write"):
        awaited = getattr(cls, kind) is not getattr(BlockDriver, kind)
        if not awaited and getattr(cls, f"submit_{kind}") is getattr(BlockDriver, f"submit_{kind}"):
            raise TypeError(f"driver {cls.driver_name} implements neither {kind} nor submit_{kind}")
    DRIVERS[cls.driver_name] = cls
    return cls
