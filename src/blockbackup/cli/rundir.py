"""The directory that holds one ``serve``'s sockets, owned for the daemon's whole life.

Why a lock: the daemon replaces stale socket files when it binds, and removes its sockets
at exit. A second ``serve --dir D`` on a directory in use would therefore take over a live
daemon's sockets and, at its own exit, delete them, leaving the first daemon unreachable.
So ``serve`` holds an exclusive ``flock`` on ``D/serve.lock`` (which also names its pid)
while it runs; a second one is refused. The lock dies with the process, so the directory
of a daemon that was killed is reused cleanly. A socket that still answers although the
lock is free (a daemon started by something else, e.g. qemu-storage-daemon) is refused
too.

A directory made by ``serve`` itself (no ``--dir``) is removed at exit, so no empty
``/tmp/blockbackup-*`` is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

from blockbackup.cli.serveerror import ServeError

__all__ = ["LOCK_NAME", "SOCKET_NAMES", "RunDir"]

LOCK_NAME = "serve.lock"
#: The socket files ``serve`` creates in its directory.
SOCKET_NAMES = ("qmp.sock", "nbd.sock")
#: Attempts to lock a lock file that a stopping daemon may unlink meanwhile.
_LOCK_ATTEMPTS = 10


class RunDir:
    """A socket directory, locked; :meth:`release` unlocks it (and removes a temporary one)."""

    def __init__(self, path: Path, fd: int, *, temporary: bool, created: bool = False) -> None:
        self.path = path
        self._fd = fd
        self.temporary = temporary
        #: ``--dir`` did not exist: a serve that fails to start removes it again.
        self.created = created

    @classmethod
    def acquire(cls, directory: str | None) -> RunDir:
        """Lock ``directory`` (created if missing), or a new temporary directory."""
        if directory is None:
            path = Path(tempfile.mkdtemp(prefix="blockbackup-"))
            return cls(path, _lock(path), temporary=True)
        path = Path(os.path.abspath(directory))
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        except OSError as exc:
            raise ServeError(f"cannot use directory {path}: {exc.strerror}") from exc
        if not path.is_dir():
            raise ServeError(f"cannot use directory {path}: Not a directory")
        fd = _lock(path)
        try:
            for name in SOCKET_NAMES:
                if _answers(path / name):
                    raise ServeError(
                        f"{path} is in use: a daemon answers on {path / name}"
                        " (stop it, or choose another --dir)"
                    )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, temporary=False, created=created)

    def release(self, *, failed: bool = False) -> None:
        """Give the directory up: the lock file goes first (while still locked, so nobody
        locks a file that is about to disappear), then a temporary directory itself, or a
        ``--dir`` this serve made if it ``failed`` to start (nothing is left of the try)."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / LOCK_NAME)
        os.close(self._fd)
        self._fd = -1
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.created and failed:
            with contextlib.suppress(OSError):  # not empty: someone else put files there
                self.path.rmdir()


def _lock(path: Path) -> int:
    """An fd holding the exclusive lock of ``path``'s lock file, with our pid written in."""
    lock_path = path / LOCK_NAME
    for _ in range(_LOCK_ATTEMPTS):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ServeError(f"cannot use directory {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ServeError(f"cannot lock {lock_path}: {exc.strerror}") from exc
            who = f" (pid {holder})" if holder else ""
            raise ServeError(
                f"{path} is in use by another blockbackup serve{who}"
                " (stop it, or choose another --dir)"
            ) from None
        if _same_file(fd, lock_path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # its owner unlinked it while we waited: lock the new one
    raise ServeError(f"cannot lock {lock_path}: it keeps being replaced")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _answers(path: Path) -> bool:
    """Whether a server accepts connections on the unix socket ``path`` (a stale socket
    file refuses them)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
