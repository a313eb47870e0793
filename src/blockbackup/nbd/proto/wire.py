"""Byte layouts of NBD messages and small pack/unpack helpers.

Why: the structs are declared once, big-endian as the spec mandates, so the
readers and writers of both roles agree on every offset by construction.
"""

from __future__ import annotations

import struct
from typing import TypeAlias

from .constants import MAX_STRING, Magic

Buffer: TypeAlias = bytes | bytearray | memoryview

#: S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
GREETING = struct.Struct(">QQH")
#: C: 32-bit client flags.
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT, option, length.
OPTION_HEADER = struct.Struct(">QII")
#: S: reply magic, option, reply type, length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: S: answer to NBD_OPT_EXPORT_NAME: size, transmission flags (+124 zero bytes).
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
#: C: magic, command flags, type, cookie, offset, length.
REQUEST = struct.Struct(">IHHQQI")
#: S: magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: magic, flags, type, cookie, length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
META_CONTEXT_ID = U32
OFFSET_HOLE = struct.Struct(">QI")
EXTENT = struct.Struct(">II")
ERROR_HEAD = struct.Struct(">IH")

U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


class WireError(ValueError):
    """A payload does not decode; the caller decides whose fault that is."""


def encode_string(text: str) -> bytes:
    """UTF-8 encode a protocol string, enforcing the spec's limits."""
    data = text.encode("utf-8")
    if len(data) > MAX_STRING or b"\0" in data:
        raise WireError("string longer than 4096 bytes or containing NUL")
    return data


def decode_string(data: Buffer) -> str:
    """Decode a protocol string received from the peer."""
    if len(data) > MAX_STRING:
        raise WireError("string longer than 4096 bytes")
    raw = bytes(data)
    if b"\0" in raw:
        raise WireError("string contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("string is not UTF-8") from exc


def decode_message(data: Buffer) -> str:
    """Decode a human-readable message leniently (it is only ever displayed)."""
    text = bytes(data[:MAX_STRING]).decode("utf-8", errors="replace").replace("\0", "?")
    while len(text.encode("utf-8")) > MAX_STRING:
        text = text[: -max(1, len(text) // 8)]
    return text


def pack_len_string(text: str) -> bytes:
    """A 32-bit length followed by the string."""
    data = encode_string(text)
    return U32.pack(len(data)) + data


class Reader:
    """Sequential decoder over one already-complete payload."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: Buffer) -> None:
        self._data = memoryview(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise WireError("payload too short")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u16(self) -> int:
        value: int = U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = U32.unpack(self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = U64.unpack(self.take(8))[0]
        return value

    def len_string(self) -> str:
        return decode_string(self.take(self.u32()))

    def rest(self) -> memoryview:
        return self.take(self.remaining)

    def end(self) -> None:
        if self.remaining:
            raise WireError("trailing bytes in payload")


def pack_option(code: int, data: bytes = b"") -> bytes:
    """Frame one client option."""
    return OPTION_HEADER.pack(Magic.IHAVEOPT, code, len(data)) + data


def pack_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """Frame one server option reply."""
    return OPTION_REPLY_HEADER.pack(Magic.OPTION_REPLY, option, reply, len(data)) + data
