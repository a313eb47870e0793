"""A pack's name: a hash of its stored bytes, so that anyone, a server without the key
included, can check a pack against its name.

Format version 1 named packs by SHA-256; version 2 by BLAKE3, which is ~4x faster here
(6.1 GB/s against 1.6 GB/s with SHA-NI, on 16 MiB packs) and is paid once per stored byte by
every backup, verify and sync. A chunk's address stays SHA-256 (keyed when encrypted): it is
what the format promises about chunks, and it is computed from the plaintext.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import blake3

#: Pack-name hashes a repository's config may name (``pack_hash``); the first is new
#: repositories'.
ALGORITHMS = ("blake3", "sha256")
#: What a version-1 config (which has no ``pack_hash``) means.
VERSION_1 = "sha256"


def name_of(data: bytes | bytearray | memoryview, algorithm: str) -> str:
    """The name of a pack whose stored bytes are ``data`` (releases the GIL)."""
    if algorithm == "blake3":
        return blake3.blake3(data).hexdigest()
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown pack hash {algorithm!r}")


def of_config(config: Mapping[str, Any]) -> str:
    """The pack-name hash of a repository (its config was checked when read)."""
    return str(config.get("pack_hash", VERSION_1))
