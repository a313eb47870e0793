"""Image locking as QEMU does it: a node's permissions as byte-range locks on its file.

Why these bytes and this kind of lock: QEMU, qemu-img, qemu-io and qemu-storage-daemon
all lock the same bytes of an image file (``block/file-posix.c``), so using them makes
each of these tools and blockbackup refuse what the others forbid:

- byte ``100 + bit`` is locked while the node *takes* that permission (bit 0 consistent
  read, 1 write, 2 write unchanged, 3 resize);
- byte ``200 + bit`` is locked while the node does *not share* it.

Every lock is a shared (read) lock, so taking one never fails; a conflict is found by
testing whether an exclusive lock *could* be placed, which fails when anyone else holds
the byte: a new use that takes ``write`` fails if byte 201 is held elsewhere (someone
unshares write), and one that unshares ``write`` fails if byte 101 is (someone writes).

The locks are open file description (OFD) locks: they belong to the file descriptor, not
the process, so two opens of one image conflict even within one process, and closing
any other descriptor of the file does not drop them (as POSIX locks would). They vanish
with the descriptor: when the node closes or the process exits.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import struct

from blockbackup.block.permissions import ALL, Perm, perm_bits, perm_name
from blockbackup.errors import BlockBackupError

log = logging.getLogger(__name__)

#: QEMU's RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE (libvirt uses byte 0).
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

_F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
#: ``struct flock`` (short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid).
_FLOCK = struct.Struct("@hhqqi4x")


@functools.cache
def ofd_locks_work() -> bool:
    """Whether this kernel has OFD locks (QEMU's ``qemu_has_ofd_lock``)."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as err:
        return err.errno != errno.EINVAL
    finally:
        os.close(fd)
    return True


def _lock_error(code: int | None, text: str) -> BlockBackupError:
    """QEMU's ``raw_lock_error_setg_errno``: a lock held elsewhere is the common case and
    gets no errno text; anything else (no lock support, ...) says what went wrong."""
    if code in (errno.EAGAIN, errno.EACCES):
        return BlockBackupError(text)
    return BlockBackupError(f"{text}: {os.strerror(code or errno.EIO)}")


class ImageLocks:
    """The lock bytes one open file holds for its node's permissions.

    ``check`` / ``commit`` / ``abort`` are QEMU's ``raw_handle_perm_lock`` prepare,
    commit and abort: ``check`` takes the union of the old and new locks and tests for
    conflicts; ``commit`` keeps exactly the new ones; ``abort`` goes back to the old.
    """

    def __init__(self, fd: int, filename: str, *, ofd: bool) -> None:
        self.fd = fd
        self.filename = filename
        self._setlk = _F_OFD_SETLK if ofd else fcntl.F_SETLK
        self._getlk = _F_OFD_GETLK if ofd else fcntl.F_GETLK
        #: The permissions committed last (taken, shared).
        self.perm = Perm.NONE
        self.shared = ALL
        #: The bits whose byte is locked now, at each base.
        self.locked_perm = Perm.NONE
        self.locked_unshared = Perm.NONE

    def _fcntl(self, cmd: int, kind: int, offset: int) -> int:
        arg = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
        out = fcntl.fcntl(self.fd, cmd, arg)
        return int(_FLOCK.unpack(out)[0])

    def _set(self, offset: int, lock: bool) -> None:
        self._fcntl(self._setlk, fcntl.F_RDLCK if lock else fcntl.F_UNLCK, offset)

    def _held_elsewhere(self, offset: int) -> bool:
        """Whether another open file holds byte ``offset`` (an exclusive lock would fail)."""
        return self._fcntl(self._getlk, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK

    def _apply(self, perm: Perm, unshared: Perm, *, unlock: bool) -> None:
        """Lock the bytes of ``perm`` and ``unshared``; with ``unlock``, unlock the rest."""
        for base, want, attr in (
            (LOCK_PERM_BASE, perm, "locked_perm"),
            (LOCK_SHARED_BASE, unshared & ALL, "locked_unshared"),
        ):
            for bit in perm_bits(ALL):
                locked: Perm = getattr(self, attr)
                offset = base + bit.bit_length() - 1
                if want & bit and not locked & bit:
                    try:
                        self._set(offset, True)
                    except OSError as err:
                        raise _lock_error(err.errno, f"Failed to lock byte {offset}") from err
                    setattr(self, attr, locked | bit)
                elif unlock and locked & bit and not want & bit:
                    try:
                        self._set(offset, False)
                    except OSError as err:
                        raise BlockBackupError(
                            f"Failed to unlock byte {offset}: {err.strerror}"
                        ) from err
                    setattr(self, attr, locked & ~bit)

    def _test(self, perm: Perm, shared: Perm) -> None:
        """Refuse ``perm`` if someone else unshares it, and unsharing what they take."""
        tests = [(LOCK_SHARED_BASE, bit, '"{}"') for bit in perm_bits(perm)]
        tests += [(LOCK_PERM_BASE, bit, 'shared "{}"') for bit in perm_bits(ALL & ~shared)]
        for base, bit, what in tests:
            text = f"Failed to get {what.format(perm_name(bit))} lock"
            try:
                held = self._held_elsewhere(base + bit.bit_length() - 1)
            except OSError as err:
                raise _lock_error(err.errno, text) from err
            if held:
                raise BlockBackupError(text)

    def check(self, perm: Perm, shared: Perm) -> None:
        """Take the locks ``perm``/``shared`` need and test for conflicts; on a conflict,
        go back to the committed locks and raise QEMU's error with its hint."""
        if self.perm | perm == self.perm and self.shared & shared == self.shared:
            return  # only fewer locks: nothing can conflict (commit drops them)
        try:
            self._apply(self.perm | perm, ~self.shared | ~shared, unlock=False)
            try:
                self._test(perm, shared)
            except BlockBackupError as err:
                err.hint = f"Is another process using the image [{self.filename}]?"
                raise
        except BaseException:
            self.abort()
            raise

    def commit(self, perm: Perm, shared: Perm) -> None:
        """Hold exactly the locks of ``perm``/``shared`` from now on."""
        self.perm, self.shared = perm, shared
        self._settle()

    def abort(self) -> None:
        """Hold exactly the locks of the permissions committed last."""
        self._settle()

    def _settle(self) -> None:
        try:
            self._apply(self.perm, ~self.shared, unlock=True)
        except BlockBackupError as err:
            # Only unlocks can be left to do, which cannot fail but on a broken file
            # system: report it, as QEMU does, and keep going.
            log.warning("%s: %s", self.filename, err)
