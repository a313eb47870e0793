"""Sans-IO NBD protocol (both roles): bytes in, events out; events in, bytes out.

Why: the asyncio server, the NBD client block driver and the tests all speak
NBD through this one implementation, which never touches a socket.
"""

from __future__ import annotations

from .connection import (
    DEFAULT_RECEIVE_CAP,
    NEED_DATA,
    ClientConnection,
    ConnectionState,
    NeedData,
    ServerConnection,
)
from .constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    MAX_FEED,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    AllocationState,
    ClientFlag,
    Cmd,
    CmdFlag,
    DirtyState,
    HandshakeFlag,
    Info,
    NbdErrno,
    Opt,
    Rep,
    ReplyType,
    TxFlag,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import *  # noqa: F403
from .events import __all__ as _events_all
from .handshake import TRANSITIONS, HandshakeState

__all__ = [
    "CONTEXT_BASE_ALLOCATION",
    "CONTEXT_QEMU_ALLOCATION_DEPTH",
    "CONTEXT_QEMU_DIRTY_BITMAP_PREFIX",
    "DEFAULT_RECEIVE_CAP",
    "MAX_FEED",
    "MAX_OPTION_LENGTH",
    "MAX_PAYLOAD",
    "NEED_DATA",
    "TRANSITIONS",
    "AllocationState",
    "ClientConnection",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "ConnectionState",
    "DirtyState",
    "HandshakeFlag",
    "HandshakeState",
    "Info",
    "LocalProtocolError",
    "NbdErrno",
    "NeedData",
    "Opt",
    "ProtocolError",
    "RemoteProtocolError",
    "Rep",
    "ReplyType",
    "ServerConnection",
    "TxFlag",
    *_events_all,
]
