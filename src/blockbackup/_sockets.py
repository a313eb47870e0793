"""Listening unix sockets, created owner-only: the one way the daemon binds a socket file.

``umask`` is process-wide, so the bind happens with the loop's thread briefly holding it;
nothing else creates files concurrently on the loop thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from blockbackup.errors import BlockBackupError

#: sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


def bind_unix(path: str) -> socket.socket:
    """A stream socket bound at ``path`` with mode 0600; a stale socket file is replaced."""
    if len(path.encode()) > UNIX_PATH_MAX:
        raise BlockBackupError(f"UNIX socket path '{path}' is too long (max {UNIX_PATH_MAX} bytes)")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created owner-only (0600)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise BlockBackupError(f"Failed to bind socket to {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    return sock
