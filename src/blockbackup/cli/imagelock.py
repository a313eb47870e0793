"""The lock ``serve`` holds on every image it serves: QEMU's lock bytes, like a guest device.

Why ``serve`` locks its images itself: a second daemon serving the same image, or qemu-io
writing to it, would corrupt a qcow2 image and silently change a raw one under its
clients. The engine's image locks refuse a second writer of a qcow2 image, but a writable
export of a *raw* image shares write (as in qemu-storage-daemon), so the engine alone would
let two ``serve`` run on one raw image. ``serve`` owns the images it serves, as a QEMU guest
device (``share-rw=off``) owns its disk: it takes what a writable export needs (consistent
read and write) and shares neither write nor resize (read-only: it takes consistent read and
still shares neither, so its clients read a stable image).

The bytes are taken by the engine's own :class:`ImageLocks` (QEMU's ``file-posix`` protocol),
on one open file description per image that lives as long as the lock. So qemu-img, qemu-io,
QEMU and qemu-storage-daemon see this lock and are refused, and ``serve`` is refused when one
of them uses the image in a way it would not share. The daemon's own file nodes are opened
with ``locking=off``: the engine would otherwise find this lock (another open file
description) and refuse its own image.
"""

from __future__ import annotations

import contextlib
import os

from blockbackup.block.drivers.file_lock import ImageLocks, ofd_locks_work
from blockbackup.block.permissions import ALL, Perm
from blockbackup.cli.serveerror import ServeError
from blockbackup.errors import BlockBackupError

__all__ = ["ImageLock"]


class ImageLock:
    """QEMU-style lock bytes held on one image for as long as this object is open."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: str, *, writable: bool) -> ImageLock:
        """Take the lock of a ``serve`` of ``path``; ServeError if another user conflicts."""
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm.NONE)
        shared = ALL & ~(Perm.WRITE | Perm.RESIZE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ServeError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            locks = ImageLocks(fd, path, ofd=ofd_locks_work())
            locks.check(perm, shared)
            locks.commit(perm, shared)
        except BlockBackupError as exc:
            os.close(fd)
            raise ServeError(f"{path}: {exc}: is another process using the image?") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Close the file description, which drops every byte it holds."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
