"""A blob decoded whole or into a caller's buffer: the same bytes, the same refusals."""

from __future__ import annotations

import os

import pytest

from blockbackup.repository import blob
from blockbackup.repository.errors import CorruptData
from blockbackup.repository.keys import Keys

TEXT = b"the quick brown fox jumps over the lazy dog\n" * 1500
RANDOM = os.urandom(65536)


@pytest.mark.parametrize("encrypted", [True, False])
@pytest.mark.parametrize("data", [TEXT, RANDOM], ids=["compressed", "stored"])
def test_decode_into_gives_the_plaintext_of_every_kind_of_blob(
    encrypted: bool, data: bytes
) -> None:
    keys = Keys(os.urandom(32) if encrypted else None)
    stored = blob.encode(keys, data, b"aad")
    assert bool(stored[0] & blob.COMPRESSED) == (data is TEXT)
    out = bytearray(len(data) + 10)
    blob.decode_into(keys, bytes(stored), b"aad", "chunk", memoryview(out)[5 : 5 + len(data)])
    assert out == bytes(5) + data + bytes(5)
    assert blob.decode(keys, bytes(stored), b"aad", "chunk", len(data)) == data


@pytest.mark.parametrize("data", [TEXT, RANDOM], ids=["compressed", "stored"])
def test_decode_into_refuses_a_wrong_size_a_wrong_address_and_damage(data: bytes) -> None:
    keys = Keys(os.urandom(32))
    stored = bytearray(blob.encode(keys, data, b"aad"))
    with pytest.raises(CorruptData, match="chunk x: content does not match"):
        blob.decode_into(keys, bytes(stored), b"aad", "chunk x", memoryview(bytearray(100)))
    out = memoryview(bytearray(len(data)))
    with pytest.raises(CorruptData, match="chunk x: authentication failed"):
        blob.decode_into(keys, bytes(stored), b"other", "chunk x", out)
    stored[20] ^= 1
    with pytest.raises(CorruptData, match="chunk x: authentication failed"):
        blob.decode_into(keys, bytes(stored), b"aad", "chunk x", out)
