"""File-to-file copies in one blocking call (run in a thread): offloaded or through a buffer.

Both exist for the same reason: a copy between two local files should cost one thread-pool
round trip and no allocation, not a read call, a fresh buffer and a write call. Also
:func:`fill`, the read-it-all loop that the file driver shares.
"""

from __future__ import annotations

import errno
import mmap
import os

from blockbackup.block.driver import io_error

#: errnos meaning "this pair of files cannot be offloaded": fall back to read + write.
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def fill(fd: int, view: memoryview, done: int, offset: int) -> None:
    """Read into ``view[done:]`` until it is full; past end of file reads as zeroes."""
    length = len(view)
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:  # past end of file (a shrunk file)
            view[done:] = bytes(length - done)
            break
        done += n


class SourceReadError(OSError):
    """The read side of :func:`copy_through_buffer` failed (error policies tell them apart)."""


def copy_file_range_all(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> None:
    """Copy exactly ``length`` bytes; ``ENOTSUP`` when the kernel cannot offload this pair."""
    while length > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        except OSError as err:
            if err.errno in _UNSUPPORTED:
                raise io_error(errno.ENOTSUP, "copy_file_range not supported") from err
            raise
        if n == 0:
            raise io_error(errno.EIO, "copy_file_range hit end of file")
        src_off += n
        dst_off += n
        length -= n


def copy_through_buffer(
    src_fd: int,
    src_off: int,
    dst_fd: int,
    dst_off: int,
    length: int,
    buffer: mmap.mmap,
    zeroes: bytes,
) -> list[tuple[int, int]]:
    """Copy ``length`` bytes a buffer at a time, skipping pieces that read as all zeroes.

    Returns the skipped runs as ``(offset, length)`` relative to the start, merged, for the
    caller to zero on the target its own way (a hole, or nothing where it already reads as
    zero). ``zeroes`` is at least as long as ``buffer``. A failed read raises
    :class:`SourceReadError`; a failed write, the plain ``OSError``.
    """
    skipped: list[tuple[int, int]] = []
    step = len(buffer)
    done = 0
    while done < length:
        n = min(step, length - done)
        with memoryview(buffer) as whole, whole[:n] as view:
            try:
                fill(src_fd, view, 0, src_off + done)
            except OSError as err:
                raise SourceReadError(err.errno, err.strerror) from err
            # A memcmp that stops at the first non-zero byte: random data costs nothing.
            if zeroes.startswith(view):
                if skipped and sum(skipped[-1]) == done:
                    skipped[-1] = (skipped[-1][0], skipped[-1][1] + n)
                else:
                    skipped.append((done, n))
            else:
                written = 0
                while written < n:
                    written += os.pwritev(dst_fd, [view[written:]], dst_off + done + written)
        done += n
    return skipped
