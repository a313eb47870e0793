"""``--daemonize``: run in the background, but return only once the daemon is ready.

Why the parent waits (as qemu-storage-daemon's ``--daemonize`` does): a script or a
systemd ``Type=forking`` unit takes the parent's exit as "ready", and connects at once.
So the parent exits 0 only after the child has printed its URIs and reported readiness
through a pipe; an error before that is printed by the child on the stderr it shares with
the parent, and the parent exits with the child's status. After readiness the child's
stdio points at /dev/null and it runs in its own session, from ``/``.
"""

from __future__ import annotations

import os

from blockbackup.cli.exitcodes import EXIT_INTERRUPTED

__all__ = ["Daemonized", "daemonize"]

_READY = b"\0"


class Daemonized:
    """The child's side of the readiness pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def ready(self) -> None:
        """Detach from the caller's terminal and pipes and let the parent exit 0.

        Stdout was flushed by the caller. The stdio fds are replaced before the byte is
        written, so that a caller reading our stdout to its end (``$(...)``) is not kept
        waiting by this process once the parent has exited."""
        if self._fd < 0:
            return
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(self._fd, _READY)
        os.close(self._fd)
        self._fd = -1


def daemonize() -> Daemonized | int:
    """Fork. In the child: a :class:`Daemonized` (call ``ready()`` once serving). In the
    parent, once the child is ready or has died: the exit status to return."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        return Daemonized(write_end)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.read(1) == _READY
    except KeyboardInterrupt:  # the daemon, in its own session, goes on starting
        return EXIT_INTERRUPTED
    if ready:
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal
        return 128 - code
    return code or 1
