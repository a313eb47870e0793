"""The lock ``serve`` holds on every image it serves: QEMU's lock bytes, taken QEMU's way.

Why ``serve`` locks its images itself: a second daemon serving the same image, or qemu-io
writing to it, would corrupt a qcow2 image and silently change a raw one under its
clients. QEMU's image locking refuses a second writer of a qcow2 image, but a writable
export of a *raw* image shares write (as in QEMU), so the engine's locks alone would let
two ``serve`` run on one raw image. ``serve`` owns the images it serves, so it states that
with one lock per image, for raw and qcow2 alike: it takes what a writable export needs
(consistent read and write) and shares neither write nor resize (read-only: it takes
consistent read and still shares neither, so its clients read a stable image).

The lock is QEMU's (``block/file-posix.c``): one open file description per image holds
shared OFD locks on byte ``100 + i`` for each permission bit ``i`` it takes and on byte
``200 + i`` for each one it does not share; a new user first takes its own bytes, then
tests the bytes that conflict (``200 + i`` for what it takes, ``100 + i`` for what it
refuses to share). So qemu-img, qemu-io, QEMU and qemu-storage-daemon see this lock and
are refused, and ``serve`` is refused when one of them uses the image in a way it would
not share. The daemon's own file nodes are opened with ``locking=off``: the engine
would otherwise find this lock (another open file description) and refuse its own image.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct

from blockbackup.cli.serveerror import ServeError

__all__ = ["ImageLock"]

PERM_BASE = 100
SHARED_BASE = 200
#: QEMU's BLK_PERM_* bits, by index: (name in QEMU's messages).
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = (1 << i for i in range(4))
ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE

#: ``struct flock`` (Linux, 64-bit ``off_t``): type, whence, start, len, pid, padding.
_FLOCK = struct.Struct("@hhqqi4x")


class ImageLock:
    """QEMU-style lock bytes held on one image for as long as this object is open."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: str, *, writable: bool) -> ImageLock:
        """Take the lock of a ``serve`` of ``path``; ServeError if another user conflicts."""
        perm = CONSISTENT_READ | (WRITE if writable else 0)
        shared = ALL & ~(WRITE | RESIZE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ServeError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            for i in range(len(PERM_NAMES)):
                if perm & (1 << i):
                    _lock_byte(fd, PERM_BASE + i)
                if not shared & (1 << i):
                    _lock_byte(fd, SHARED_BASE + i)
            for i, name in enumerate(PERM_NAMES):
                if perm & (1 << i) and _held_elsewhere(fd, SHARED_BASE + i):
                    raise ServeError(_conflict(path, f'Failed to get "{name}" lock'))
                if not shared & (1 << i) and _held_elsewhere(fd, PERM_BASE + i):
                    raise ServeError(_conflict(path, f'Failed to get shared "{name}" lock'))
        except OSError as exc:
            os.close(fd)
            raise ServeError(f"cannot lock {path}: {exc.strerror}") from exc
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


def _conflict(path: str, what: str) -> str:
    return f"{path}: {what}: is another process using the image?"


def _lock_byte(fd: int, offset: int) -> None:
    """A shared (read) OFD lock on one byte, as QEMU's ``qemu_lock_fd``."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0))


def _held_elsewhere(fd: int, offset: int) -> bool:
    """Whether another open file description holds a lock on the byte (``qemu_lock_fd_test``
    asks whether an exclusive lock could be taken there)."""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    l_type = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))[0]
    return bool(l_type != fcntl.F_UNLCK)
