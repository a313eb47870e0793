"""One stored blob: what a chunk or a metadata object becomes on storage, and back.

Layout: ``flags (1 byte)`` then the payload; flag bit 0 = zstd, bit 1 = encrypted
(payload = 12-byte random nonce + AES-256-GCM(data, associated data = the address)).
Decoding checks the tag and the address, so wrong bytes are never returned.
"""

from __future__ import annotations

import secrets
import threading

import zstandard
from cryptography.exceptions import InvalidTag

from blockbackup.repository.errors import CorruptData
from blockbackup.repository.keys import Keys

COMPRESSED = 1
ENCRYPTED = 2
ZSTD_LEVEL = 1

# A zstandard (de)compressor object must not be used by two threads at once (it crashes
# the process): chunks are encoded in parallel threads, so each thread has its own.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def stored_size(keys: Keys, payload: int) -> int:
    """The size of the blob of a ``payload``-byte payload (compressed or not)."""
    return 1 + payload + (12 + 16 if keys.aead is not None else 0)


def encode(keys: Keys, data: bytes | bytearray | memoryview, aad: bytes) -> bytes | bytearray:
    """Stored bytes of ``data``: compressed if that is smaller, encrypted if keyed."""
    payload, compressed = _packed(data)
    out = bytearray(stored_size(keys, len(payload)))
    with memoryview(out) as view:
        _seal(keys, payload, compressed, aad, view)
    return out


def encode_into(
    keys: Keys, data: bytes | bytearray | memoryview, aad: bytes, out: memoryview
) -> int:
    """As :func:`encode`, written at the start of ``out`` (room for ``len(data)`` plus
    29 bytes); the blob's length. An encoder process writes blobs so straight into the
    memory it shares with the backup: the cipher's output is the blob, no copy after."""
    payload, compressed = _packed(data)
    size = stored_size(keys, len(payload))
    _seal(keys, payload, compressed, aad, out[:size])
    return size


def _packed(
    data: bytes | bytearray | memoryview,
) -> tuple[bytes | bytearray | memoryview, bool]:
    """The payload to store (``data`` compressed if that is smaller), and whether it is."""
    packed = _compressor().compress(data)
    return (packed, True) if len(packed) < len(data) else (data, False)


def _seal(
    keys: Keys,
    payload: bytes | bytearray | memoryview,
    compressed: bool,
    aad: bytes,
    out: memoryview,
) -> None:
    """Flags, then the payload as is or encrypted (``out`` is exactly the blob's size):
    one copy by the cipher (``encrypt_into``), none of its output."""
    flags = COMPRESSED if compressed else 0
    if keys.aead is None:
        out[0] = flags
        out[1:] = payload
        return
    nonce = secrets.token_bytes(12)
    out[0] = flags | ENCRYPTED
    out[1:13] = nonce
    keys.aead.encrypt_into(nonce, payload, aad, out[13:])


def _payload(keys: Keys, stored: bytes | memoryview, what: str) -> tuple[int, memoryview]:
    """The flags and payload of a blob, its flags checked."""
    if not stored:
        raise CorruptData(f"{what}: empty blob")
    flags = stored[0]
    if flags & ~(COMPRESSED | ENCRYPTED):
        raise CorruptData(f"{what}: unknown blob flags {flags:#x}")
    if bool(flags & ENCRYPTED) != keys.encrypted:
        raise CorruptData(f"{what}: encryption flag does not match the repository")
    return flags, memoryview(stored)[1:]


def _tampered(what: str) -> CorruptData:
    """What a failed GCM tag check raises: the :class:`CorruptData` that names ``what``.
    (A plain ``try`` at each call, not a context manager: that cost 4-5 us per chunk,
    measured in a verify's profile.)"""
    return CorruptData(f"{what}: authentication failed (damaged or tampered)")


def _decrypt(keys: Keys, view: memoryview, aad: bytes, what: str) -> bytes | memoryview:
    """The payload decrypted (as is when the repository is not encrypted)."""
    if keys.aead is None:
        return view
    try:
        return keys.aead.decrypt(view[:12], view[12:], aad)
    except InvalidTag:
        raise _tampered(what) from None


def _decompress(payload: bytes | memoryview, size: int, what: str) -> bytes:
    try:
        return _decompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"{what}: cannot decompress: {exc}") from None


def decode(keys: Keys, stored: bytes | memoryview, aad: bytes, what: str, size: int) -> bytes:
    """The plaintext of a blob (at most ``size`` bytes), or :class:`CorruptData` naming ``what``."""
    flags, view = _payload(keys, stored, what)
    payload = _decrypt(keys, view, aad, what)
    if flags & COMPRESSED:
        payload = _decompress(payload, size, what)
    return bytes(payload)


def decode_into(
    keys: Keys, stored: bytes | memoryview, aad: bytes, what: str, out: memoryview
) -> None:
    """Decode a blob whose plaintext is exactly ``len(out)`` bytes into ``out``, or raise
    :class:`CorruptData` naming ``what`` (``out`` may then hold part of it).

    Why: a restore assembles each request from its chunks. An uncompressed chunk (random
    data: most of a disk's stored bytes) is decrypted straight into its place, with no
    plaintext object to allocate and copy; a compressed one is copied once, from zstd's
    output."""
    flags, view = _payload(keys, stored, what)
    size = len(out)
    if keys.aead is not None and not flags & COMPRESSED:
        if len(view) != 12 + size + 16:
            raise CorruptData(f"{what}: content does not match its address")
        try:
            keys.aead.decrypt_into(view[:12], view[12:], aad, out)
        except InvalidTag:
            raise _tampered(what) from None
        return
    payload = _decrypt(keys, view, aad, what)
    if flags & COMPRESSED:
        payload = _decompress(payload, size, what)
    if len(payload) != size:
        raise CorruptData(f"{what}: content does not match its address")
    out[:] = payload
