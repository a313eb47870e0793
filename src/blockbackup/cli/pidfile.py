"""``--pidfile``: a file naming the daemon's pid, locked while it runs, removed at exit.

Why locked, and the way QEMU does it (``qemu_write_pidfile``: a POSIX ``lockf`` write lock
on the whole file): a second daemon given the same pidfile is refused instead of
overwriting it, and a supervisor (systemd's ``PIDFile=``) can trust the pid it reads. The
lock is taken as early as possible (a busy pidfile is an error before anything is served)
and the pid is written only once the daemon is ready, so whoever sees the pid can use the
daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from blockbackup.cli.serveerror import ServeError

__all__ = ["PidFile"]

_ATTEMPTS = 10


class PidFile:
    """A locked pidfile; :meth:`write` fills it in, :meth:`release` removes it."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: str) -> PidFile:
        """Create and lock ``path``; raises ServeError if another process holds it.

        POSIX locks belong to the process: the caller must never open this file again
        (closing any fd of it would drop the lock)."""
        path = os.path.abspath(path)
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ServeError(f"cannot create PID file {path}: {exc.strerror}") from exc
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f" by pid {holder}" if holder.isdigit() else ""
                raise ServeError(f"PID file {path} is locked{who}: is a daemon running?") from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)  # a stale pid must not be read as ours
                return cls(path, fd)
            os.close(fd)  # unlinked by its exiting owner meanwhile: lock the new file
        raise ServeError(f"cannot lock PID file {path}: it keeps being replaced")

    def write(self) -> None:
        """Record this process's pid (call when the daemon is ready)."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Remove the file, then drop the lock."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
