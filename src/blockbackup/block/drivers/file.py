"""``file``: raw image files and block devices, with every blocking call off the loop.

- data: ``os.preadv``/``os.pwritev`` in the I/O thread pools (O_DIRECT with
  ``cache.direct``, through page-aligned buffers), with two bounded exceptions that run
  on the loop thread because a thread-pool round trip costs several times the call
  itself (measured in docs/performance.md, "In-process request path"):

  * guest reads try ``preadv2(RWF_NOWAIT)`` first: the kernel copies from the page cache or
    fails with ``EAGAIN`` instead of waiting for the disk; what is not cached is read in
    the pool. The copy is bounded by ``INLINE_READ_MAX``.
  * buffered writes of at most ``INLINE_WRITE_MAX`` (no O_DIRECT, no FUA, guest
    context only) are a ``pwrite`` into the page cache. ext4 has no ``RWF_NOWAIT`` for
    buffered writes, so such a call can still sleep in dirty-page throttling; every
    inline write is timed, and one that took longer than ``INLINE_SLOW`` sends this
    file's writes to the pool for a back-off period that doubles while it keeps
    happening. A throttled disk therefore costs the loop at most one stall per period.
- block status: ``SEEK_DATA``/``SEEK_HOLE``, so holes cost nothing to back up; on the loop
  thread, timed (over 2 ms: the pool for a while, as for writes);
- write-zeroes: ``fallocate`` (punch hole when unmapping is allowed, else zero range),
  falling back to writing zero buffers;
- discard: punch hole, only with ``discard=unmap`` (QEMU's default ignores discards);
- flush: ``fdatasync``;
- truncate: ``ftruncate`` (block devices: any size up to the device's, never past it);
- locking: the node's permissions as QEMU's lock bytes on the file (:mod:`.file_lock`),
  option ``locking`` (``auto``: where OFD locks work, ``on``, ``off``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Coroutine
from typing import Any, ClassVar

from blockbackup._aio import in_background, inline_may_skip_yield, run_blocking
from blockbackup.block.copy_range import fill
from blockbackup.block.driver import (
    BlockDriver,
    Buffer,
    Extent,
    Limits,
    Status,
    WriteFlags,
    io_error,
    register,
)
from blockbackup.block.drivers.file_lock import ImageLocks, ofd_locks_work
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import Perm
from blockbackup.errors import BlockBackupError

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
DIRECT_ALIGNMENT = 4096

#: Largest write done on the loop thread (a page-cache copy of at most this size), as for
#: reads. 1 MiB sequential NBD writes ran at 1.15-1.25x of qemu-storage-daemon with 1 MiB
#: and 0.9-1.0x with 64 KiB: the pool's hand-off costs more than the copy it moves off
#: the loop, and a 1 MiB copy holds the loop for a few hundred microseconds at most.
INLINE_WRITE_MAX = 1 << 20
#: Largest read tried on the loop thread with ``RWF_NOWAIT`` (page-cache copies only).
INLINE_READ_MAX = 1 << 20
#: An inline write slower than this (seconds) means the kernel throttled or blocked it. It
#: sits well above the interpreter's GIL switch interval (5 ms): getting the GIL back after
#: the call can take that long when job threads are busy, and the pool, which needs the GIL
#: too, would only make that worse. Dirty-page throttling sleeps for longer than this.
INLINE_SLOW = 0.02
#: An inline block status slower than this (seconds) read the extent tree from disk or
#: asked a server (NFS): unlike a page-cache write it can take that long every time.
INLINE_STATUS_SLOW = 0.002
#: First and longest back-off (seconds) during which such calls go to the pool again.
INLINE_BACKOFF_MIN = 0.5
INLINE_BACKOFF_MAX = 30.0
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with flags (``os.posix_fallocate`` has none); raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _pread_all(fd: int, length: int, offset: int, direct: bool) -> bytes | bytearray | memoryview:
    buf: bytearray | mmap.mmap = mmap.mmap(-1, length) if direct else bytearray(length)
    view = memoryview(buf)
    fill(fd, view, 0, offset)
    if isinstance(buf, mmap.mmap):
        data = bytes(view)
        view.release()
        buf.close()
        return data
    return buf


def _pread_rest(fd: int, buf: bytearray | memoryview, done: int, offset: int) -> Buffer:
    """Finish a buffered read that the page cache could not serve, in the pool."""
    fill(fd, memoryview(buf), done, offset)
    return buf


def _pwrite_all(
    fd: int, data: bytes | bytearray | memoryview, offset: int, direct: bool, fua: bool
) -> None:
    src = memoryview(data)
    aligned: mmap.mmap | None = None
    if direct:
        aligned = mmap.mmap(-1, len(src))
        aligned.write(src)
        src = memoryview(aligned)
    try:
        done = 0
        while done < len(src):
            done += os.pwritev(fd, [src[done:]], offset + done)
        if fua:
            os.fdatasync(fd)
    finally:
        if aligned is not None:
            src.release()
            aligned.close()


def _seek_extent(fd: int, offset: int, length: int) -> tuple[int, bool]:
    """(length, is_data) of the data or hole run at ``offset``, clipped to ``length``."""
    end = offset + length
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as err:
        if err.errno == errno.ENXIO:  # only a hole up to end of file
            return length, False
        if err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return length, True
        raise
    if data > offset:
        return min(data, end) - offset, False
    hole = os.lseek(fd, offset, os.SEEK_HOLE)
    return max(1, min(hole, end) - offset), True


class _Backoff:
    """When a kind of inline call may run on the loop thread again after one was slow."""

    __slots__ = ("after", "period", "slow")

    def __init__(self, slow: float) -> None:
        #: Calls slower than this (seconds) start a back-off.
        self.slow = slow
        #: ``time.monotonic()`` before which calls go to the pool.
        self.after = 0.0
        self.period = INLINE_BACKOFF_MIN

    def took(self, start: float, seconds: float) -> None:
        """Record an inline call; a slow one sends the next ones to the pool for a while,
        longer each time in a row."""
        if seconds > self.slow:
            self.stalled(start + seconds)

    def stalled(self, now: float) -> None:
        if now - self.after > INLINE_BACKOFF_MAX:
            self.period = INLINE_BACKOFF_MIN  # the last stall is long past
        self.after = now + self.period
        self.period = min(self.period * 2, INLINE_BACKOFF_MAX)


@register
class FileDriver(BlockDriver):
    """Protocol driver over a local file or block device."""

    driver_name: ClassVar[str] = "file"

    def __init__(
        self,
        node: BlockNode,
        fd: int,
        size: int,
        filename: str,
        direct: bool,
        device_size: int | None = None,
        locks: ImageLocks | None = None,
    ) -> None:
        super().__init__(node)
        self.fd = fd
        #: The lock bytes held for the node's permissions (None: ``locking=off``).
        self.locks = locks
        self.filename = filename
        self._size = size
        #: Size of the block device under the node (None: a regular file, which can grow).
        self.device_size = device_size
        self._direct = direct
        self._no_flush = node.config.no_flush
        self._can_punch = True
        self._can_zero_range = True
        # cluster_size=0: a file has no clusters and says so (QEMU's file-posix answers
        # bdrv_get_info), so a raw backup target gets no "block size" warning, as in QEMU.
        self.limits = Limits(request_alignment=DIRECT_ALIGNMENT if direct else 1, cluster_size=0)
        #: Small buffered writes may run on the loop thread (see the module docstring).
        self._inline_writes = not direct
        #: ``time.monotonic()`` before which writes go to the pool (after a slow one).
        self._write_backoff = _Backoff(INLINE_SLOW)
        self._status_backoff = _Backoff(INLINE_STATUS_SLOW)
        self._inline_reads = not direct and _RWF_NOWAIT != 0

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> FileDriver:
        filename = opts.str("filename")
        opts.enum("aio", ("threads", "native", "io_uring"), "threads")
        locking = opts.enum("locking", ("auto", "on", "off"), "auto")
        opts.int("aio-max-batch", 0)
        opts.bool("drop-cache", True)
        opts.bool("x-check-cache-dropped", False)
        opts.str("pr-manager", None)
        flags = os.O_RDONLY if node.config.read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        if node.config.cache_direct:
            flags |= os.O_DIRECT
        try:
            fd = await run_blocking(os.open, filename, flags)
        except OSError as err:
            raise BlockBackupError(f"Could not open '{filename}': {err.strerror}") from err
        try:
            size, is_device = await run_blocking(_size_of, fd)
        except OSError as err:
            os.close(fd)
            raise BlockBackupError(f"Could not open '{filename}': {err.strerror}") from err
        device_size = size if is_device else None
        locks = None
        if locking == "on" or (locking == "auto" and ofd_locks_work()):
            ofd = ofd_locks_work()
            if not ofd:
                log.warning(
                    "File lock requested but OFD locking syscall is unavailable, "
                    "falling back to POSIX file locks. Due to the implementation, "
                    "locks can be lost unexpectedly."
                )
            locks = ImageLocks(fd, filename, ofd=ofd)
        return cls(node, fd, size, filename, node.config.cache_direct, device_size, locks)

    @property
    def size(self) -> int:
        return self._size

    def submit_read(
        self, offset: int, length: int, into: memoryview | None = None
    ) -> Buffer | Coroutine[Any, Any, Buffer]:
        """The read from the page cache (``RWF_NOWAIT``) on the loop thread when all of
        it is cached, else the pool's read (of what is left, when the page cache gave a
        part: from disk, and zeroes past the end of file).

        Inline only for guests (not in background jobs), buffered, up to
        ``INLINE_READ_MAX``.
        """
        if not self._inline_reads or length > INLINE_READ_MAX or in_background():
            return run_blocking(_pread_all, self.fd, length, offset, self._direct)
        buf = bytearray(length) if into is None else into
        with memoryview(buf) as view:
            done = self._read_cached(view, offset)
        if done == length:
            return buf
        return run_blocking(_pread_rest, self.fd, buf, done, offset)

    def _read_cached(self, view: memoryview, offset: int) -> int:
        """Bytes read into ``view`` from the page cache only (``RWF_NOWAIT``).

        Stops short at data not cached or at end of file. Raises other errors, except a
        kernel or file system that refuses ``RWF_NOWAIT``: inline reads are then off.
        """
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done, _RWF_NOWAIT)
                if n == 0:
                    break
                done += n
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._inline_reads = False
        return done

    def submit_write(
        self, offset: int, data: Buffer, flags: WriteFlags
    ) -> Coroutine[Any, Any, None] | None:
        """The inline page-cache write (see the module docstring), else the pool's."""
        fua = bool(flags & WriteFlags.FUA) and not self._no_flush
        if (
            self._inline_writes
            and not fua
            and len(data) <= INLINE_WRITE_MAX
            and not in_background()
        ):
            start = time.monotonic()
            if start >= self._write_backoff.after:
                _pwrite_all(self.fd, data, offset, False, False)
                self._write_backoff.took(start, time.monotonic() - start)
                return None
        return run_blocking(_pwrite_all, self.fd, data, offset, self._direct, fua)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        if flags & WriteFlags.MAY_UNMAP and self._can_punch:
            if await self._try_fallocate(
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
            ):
                return self._maybe_fua_sync(flags)
            self._can_punch = False
        if self._can_zero_range:
            if await self._try_fallocate(
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length
            ):
                return self._maybe_fua_sync(flags)
            self._can_zero_range = False
        await super().write_zeroes(offset, length, flags)

    def _maybe_fua_sync(self, flags: WriteFlags) -> None:
        # fallocate is synchronous metadata work; FUA additionally asks for durability,
        # which a later flush provides. Kept explicit so the choice is visible.
        return None

    async def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        try:
            await run_blocking(fallocate, self.fd, mode, offset, length)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                return False
            raise
        return True

    async def discard(self, offset: int, length: int) -> None:
        if not self.node.config.discard_unmap or not self._can_punch:
            return
        if not await self._try_fallocate(
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
        ):
            self._can_punch = False

    async def truncate(self, size: int) -> None:
        if self.device_size is not None:
            # A block device has the size it has: a smaller node is a window onto it.
            if size > self.device_size:
                raise io_error(
                    errno.ENOSPC,
                    f"cannot grow block device {self.filename} past {self.device_size} bytes",
                )
        else:
            await run_blocking(os.ftruncate, self.fd, size)
        self._size = size

    async def flush(self) -> None:
        if not self._no_flush:
            await run_blocking(os.fdatasync, self.fd)

    async def block_status(self, offset: int, length: int) -> Extent:
        start = time.monotonic()
        if start >= self._status_backoff.after:
            # Two lseeks over a cached extent tree: a pool round trip costs 20-50 times
            # more, and a sparse disk's backup asks once per extent (docs/performance.md,
            # "Sparse scale"). Timed: a file system that reads its extents from disk or
            # asks a server (NFS) sends its calls to the pool for a while.
            n, is_data = _seek_extent(self.fd, offset, length)
            self._status_backoff.took(start, time.monotonic() - start)
            if not inline_may_skip_yield():
                await asyncio.sleep(0)  # yield as a pool call would: no caller starves it
        else:
            n, is_data = await run_blocking(_seek_extent, self.fd, offset, length)
        status = Status.ALLOCATED | (Status.DATA if is_data else Status.ZERO)
        return Extent(offset, n, status)

    async def drop_cache(self, offset: int, length: int) -> None:
        if self.early_writeback():
            await run_blocking(_drop_cache, self.fd, offset, length)

    def early_writeback(self) -> bool:
        # O_DIRECT has no page cache; a no-flush node was told to spare the storage.
        return not self._direct and not self._no_flush

    def fd_map(self, offset: int) -> tuple[int, int] | None:
        return None if self._direct else (self.fd, offset)

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if self.locks is not None:
            self.locks.check(perm, shared)

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        if self.locks is not None:
            self.locks.commit(perm, shared)

    def abort_perm(self) -> None:
        if self.locks is not None:
            self.locks.abort()

    async def close(self) -> None:
        os.close(self.fd)  # drops every lock this open file holds
        self.locks = None


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Start writeback of the range's dirty pages and evict its clean ones (advisory).

    Dirty pages and pages under writeback stay: a later drop (or the one after a backup's
    final flush) evicts them. Waiting for their writeback here would hold a pool thread
    for it, which cost a backup about a tenth of its speed (measured).
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _size_of(fd: int) -> tuple[int, bool]:
    """(size, is a block device)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0]), True
    return st.st_size, False
