"""Exceptions of the sans-IO NBD layer.

Why: callers must tell "my application misused the API" (a bug here, never
the peer's fault) from "the peer broke the protocol" (drop the connection).
Both carry an ``errno_hint`` so a server can still answer with a wire errno.
"""

from __future__ import annotations

from .constants import NbdErrno


class ProtocolError(Exception):
    """Base class; never raised directly."""

    def __init__(self, msg: str, errno_hint: NbdErrno = NbdErrno.EINVAL) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(msg)
        self.errno_hint = errno_hint


class LocalProtocolError(ProtocolError):
    """The local application tried to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; the connection is unusable."""
