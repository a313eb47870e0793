"""Keys: one random master key, wrapped by key slots; the keys derived from it.

Why slots: adding or removing a passphrase writes or deletes one small object and
re-encrypts no data (the peers cannot rotate keys at all, or rewrap per block).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from blockbackup.repository.errors import CorruptData, RepositoryError, WrongKey

#: scrypt cost for new slots: 2**15 * 8 * 128 bytes = 32 MiB of memory, ~0.1 s.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
SLOT_VERSION = 1
SLOT_KINDS = ("passphrase", "key-file")

ZERO_ADDRESS = bytes(32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class Keys:
    """What the master key gives: the address key and the data cipher (None: unencrypted)."""

    def __init__(self, master: bytes | None) -> None:
        self.master = master
        self.id_key = b""
        self.aead: AESGCM | None = None
        if master is not None:
            self.id_key = _derive(master, b"blockbackup id key v1")
            self.aead = AESGCM(_derive(master, b"blockbackup data key v1"))

    @property
    def encrypted(self) -> bool:
        return self.master is not None

    def address(self, data: bytes | bytearray | memoryview) -> bytes:
        """The chunk's address: keyed SHA-256 when encrypted, plain SHA-256 when not."""
        if self.master is None:
            return hashlib.sha256(data).digest()
        return hmac.digest(self.id_key, data, "sha256")


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def new_master_key() -> bytes:
    return secrets.token_bytes(32)


def _slot_key(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def _aad(repo_id: str, slot_id: str) -> bytes:
    return f"blockbackup key slot {repo_id} {slot_id}".encode()


def make_slot(
    master: bytes, secret: bytes, kind: str, repo_id: str, slot_id: str, comment: str = ""
) -> dict[str, Any]:
    """A key slot (JSON-able) that gives back ``master`` to whoever knows ``secret``."""
    if kind not in SLOT_KINDS:
        raise RepositoryError(f"unknown key slot kind {kind!r}")
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    key = _slot_key(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    wrapped = AESGCM(key).encrypt(nonce, master, _aad(repo_id, slot_id))
    return {
        "version": SLOT_VERSION,
        "kind": kind,
        "kdf": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": _b64(salt),
        "nonce": _b64(nonce),
        "wrapped": _b64(wrapped),
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "comment": comment,
    }


def parse_slot(data: bytes, slot_id: str) -> dict[str, Any]:
    try:
        slot = json.loads(data)
        if not isinstance(slot, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise CorruptData(f"key slot {slot_id} is damaged: {exc}") from None
    if slot.get("version") != SLOT_VERSION or slot.get("kdf") != "scrypt":
        raise RepositoryError(f"key slot {slot_id} has an unsupported version or kdf")
    return slot


def open_slot(slot: dict[str, Any], secret: bytes, repo_id: str, slot_id: str) -> bytes | None:
    """The master key if ``secret`` opens this slot, else None."""
    try:
        key = _slot_key(
            secret, _unb64(slot["salt"]), int(slot["n"]), int(slot["r"]), int(slot["p"])
        )
        return AESGCM(key).decrypt(
            _unb64(slot["nonce"]), _unb64(slot["wrapped"]), _aad(repo_id, slot_id)
        )
    except InvalidTag:
        return None
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptData(f"key slot {slot_id} is damaged: {exc}") from None


def unlock(slots: dict[str, dict[str, Any]], secret: bytes, repo_id: str) -> tuple[bytes, str]:
    """(master key, slot id) from the first slot ``secret`` opens, else :class:`WrongKey`."""
    for slot_id, slot in sorted(slots.items()):
        master = open_slot(slot, secret, repo_id, slot_id)
        if master is not None:
            return master, slot_id
    raise WrongKey("wrong passphrase or key file: no key slot of this repository opens with it")
