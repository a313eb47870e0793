"""The one error type of ``blockbackup serve``'s preparation steps.

Why one type: every check before the daemon starts (the image, its format, the socket
directory, the pidfile, the listen address) ends the same way for the user, one line on
stderr and exit status 1, so ``serve`` catches this type once and never shows a traceback.
"""

from __future__ import annotations


class ServeError(Exception):
    """A user error found by ``serve``; its text is the whole message (no prefix)."""
