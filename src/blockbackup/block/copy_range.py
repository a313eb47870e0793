"""``copy_file_range`` with the loop and fallbacks the syscall needs (runs in a thread)."""

from __future__ import annotations

import errno
import os

from blockbackup.block.driver import io_error

#: errnos meaning "this pair of files cannot be offloaded": fall back to read + write.
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


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
