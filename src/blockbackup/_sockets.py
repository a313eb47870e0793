"""Socket addresses as QAPI gives them, and owner-only listening unix sockets.

Why one module below both NBD roles: the NBD server (``nbd-server-start``, the daemon's
``--nbd-server``) and the ``nbd`` block driver's client (``server``) take the same QAPI
``SocketAddress``; parsing it here keeps the client from importing the server.

``umask`` is process-wide, so a unix bind happens with the loop's thread briefly holding
it; nothing else creates files concurrently on the loop thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Mapping
from typing import Any

from blockbackup.errors import BlockBackupError

#: sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


def parse_socket_address(addr: Mapping[str, Any]) -> dict[str, str]:
    """Normalise a QAPI ``SocketAddress`` or ``SocketAddressLegacy`` to a flat dict.

    Accepts ``{"type": "unix", "path": P}``, ``{"type": "inet", "host": H, "port": N}`` and
    the legacy forms with the fields under ``"data"``.
    """
    if not isinstance(addr, Mapping):
        raise BlockBackupError("Invalid parameter type for 'addr', expected: object")
    kind = addr.get("type")
    fields: Mapping[str, Any] = addr
    data = addr.get("data")
    if isinstance(data, Mapping):
        fields = data
    if kind == "unix":
        path = fields.get("path")
        if not isinstance(path, str):
            raise BlockBackupError("Parameter 'addr.path' is missing")
        return {"type": "unix", "path": path}
    if kind == "inet":
        host = fields.get("host", "127.0.0.1")
        port = fields.get("port")
        if port is None:
            raise BlockBackupError("Parameter 'addr.port' is missing")
        return {"type": "inet", "host": str(host) or "127.0.0.1", "port": str(port)}
    if kind is None:
        raise BlockBackupError("Parameter 'addr.type' is missing")
    raise BlockBackupError(f"Parameter 'addr.type' does not accept value '{kind}'")


def bind_unix(path: str) -> socket.socket:
    """A stream socket listening at ``path`` with mode 0600; a stale socket file is replaced.

    The socket is bound and listening under a temporary name first, then renamed into
    place: whoever sees ``path`` appear can connect at once (a plain bind publishes the
    file before ``listen``, and a client that is quick enough gets ECONNREFUSED).
    """
    if len(path.encode()) > UNIX_PATH_MAX:
        raise BlockBackupError(f"UNIX socket path '{path}' is too long (max {UNIX_PATH_MAX} bytes)")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            # Never replace anything but a socket (a plain bind would refuse too).
            raise BlockBackupError(f"Failed to bind socket to {path}: Address already in use")
    staging = f"{path}.{os.getpid()}~"
    if len(staging.encode()) > UNIX_PATH_MAX:
        staging = path  # no room for a temporary name: bind in place
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(staging).st_mode):
            os.unlink(staging)  # stale: ours from an earlier run, or the target itself
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created owner-only (0600)
    try:
        sock.bind(staging)
        sock.listen(socket.SOMAXCONN)
        if staging != path:
            os.rename(staging, path)  # atomic: replaces a stale socket file, if any
    except OSError as exc:
        sock.close()
        if staging != path:
            with contextlib.suppress(OSError):
                os.unlink(staging)
        raise BlockBackupError(f"Failed to bind socket to {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    return sock
