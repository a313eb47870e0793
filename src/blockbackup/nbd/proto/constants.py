"""Numeric values of the NBD protocol as enums.

Why: every magic number, option code and flag lives here once, named after
the spec (``NetworkBlockDevice/nbd doc/proto.md``), so the parsers and writers
never use bare integers and mypy can tell an option code from a reply type.
"""

from __future__ import annotations

import enum
import errno as _errno

#: Largest READ/WRITE payload we accept or send (2^25, the spec's
#: "SHOULD NOT be considered a denial of service" bound).
MAX_PAYLOAD = 32 * 1024 * 1024
#: Largest option (client) or option reply (server) body we are willing to buffer.
MAX_OPTION_LENGTH = 64 * 1024
#: Spec limit for any string (export names, error messages, context names).
MAX_STRING = 4096
#: How much a caller may feed per ``receive_data`` call and still be guaranteed
#: not to trip the receive cap, as long as it drains ``next_event`` in between.
MAX_FEED = 1024 * 1024
#: Default maximum block size when the server advertised none.
DEFAULT_MAX_BLOCK = 0xFFFFFFFF
#: Canonical context names.
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


class Magic(enum.IntEnum):
    """Magic numbers that frame every message."""

    NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
    IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
    CLISERV = 0x00420281861253  # oldstyle second magic (refused)
    OPTION_REPLY = 0x3E889045565A9
    REQUEST = 0x25609513
    SIMPLE_REPLY = 0x67446698
    STRUCTURED_REPLY = 0x668E33EF


class HandshakeFlag(enum.IntFlag):
    """16-bit flags the server sends in its greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """32-bit flags the client answers the greeting with."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    """Option codes (``NBD_OPT_*``)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types (``NBD_REP_*``); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9


REP_ERROR_BIT = _REP_ERR


class Info(enum.IntEnum):
    """Information types in ``NBD_REP_INFO`` (``NBD_INFO_*``)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(enum.IntFlag):
    """16-bit transmission flags describing an export."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    """Request types (``NBD_CMD_*``)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    """16-bit request flags (``NBD_CMD_FLAG_*``)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


ALL_CMD_FLAGS = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (``NBD_REPLY_TYPE_*``)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_TYPE_ERROR_BIT = 1 << 15


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class AllocationState(enum.IntFlag):
    """Extent flags of the ``base:allocation`` context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class DirtyState(enum.IntFlag):
    """Extent flags of a ``qemu:dirty-bitmap:NAME`` context."""

    DIRTY = 1 << 0


class NbdErrno(enum.IntEnum):
    """Error values allowed on the wire; they happen to equal Linux errnos."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108

    @classmethod
    def from_host(cls, host_errno: int) -> NbdErrno:
        """Map a host ``errno`` value to the closest wire value (default EIO)."""
        return _HOST_ERRNO_MAP.get(host_errno, cls.EIO)

    @classmethod
    def from_wire(cls, value: int) -> NbdErrno:
        """Decode a wire value; unknown values count as EINVAL, as the spec asks."""
        try:
            return cls(value)
        except ValueError:
            return cls.EINVAL


_HOST_ERRNO_MAP: dict[int, NbdErrno] = {
    _errno.EPERM: NbdErrno.EPERM,
    # QEMU sends EINVAL for what it has no wire value for; clients rely on these two
    # (a broken fleecing snapshot, a timed-out copy-before-write).
    _errno.EACCES: NbdErrno.EINVAL,
    _errno.ETIMEDOUT: NbdErrno.EINVAL,
    _errno.EROFS: NbdErrno.EPERM,
    _errno.EIO: NbdErrno.EIO,
    _errno.ENOMEM: NbdErrno.ENOMEM,
    _errno.EINVAL: NbdErrno.EINVAL,
    _errno.ENOSPC: NbdErrno.ENOSPC,
    _errno.EDQUOT: NbdErrno.ENOSPC,
    _errno.EFBIG: NbdErrno.ENOSPC,
    _errno.EOVERFLOW: NbdErrno.EOVERFLOW,
    _errno.ENOTSUP: NbdErrno.ENOTSUP,
    _errno.EOPNOTSUPP: NbdErrno.ENOTSUP,
    _errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
}
