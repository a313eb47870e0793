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
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from blockbackup.repository.errors import CorruptData, RepositoryError, WrongKey

#: scrypt cost for new slots: 2**15 * 8 * 128 bytes = 32 MiB of memory, ~0.1 s.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
#: Argon2id cost for new slots (RFC 9106's second recommended option, with more memory):
#: 64 MiB, 3 passes, 4 lanes: ~0.2 s of CPU (measured; scrypt: 0.08 s), every guess 64 MiB.
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
#: The key derivation functions a slot may use; the first is the default for new slots.
KDFS = ("argon2id", "scrypt")
DEFAULT_KDF = KDFS[0]
#: Bounds on the costs a slot may ask for: a damaged or hostile slot must not make opening
#: the repository take all memory (4 GiB) or forever.
_MAX_MEMORY = 4 << 30
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


def _kdf_params(kdf: str) -> dict[str, int]:
    """The cost parameters recorded in a new slot of ``kdf``."""
    if kdf == "scrypt":
        return {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    if kdf == "argon2id":
        return {"m": ARGON2_MEMORY_KIB, "t": ARGON2_ITERATIONS, "p": ARGON2_LANES}
    raise RepositoryError(f"unknown key derivation function {kdf!r} (known: {', '.join(KDFS)})")


def _slot_key(secret: bytes, salt: bytes, slot: dict[str, Any]) -> bytes:
    """The key that wraps the master key, derived as the slot records (kdf and costs)."""
    kdf = slot.get("kdf")
    if kdf == "scrypt":
        n, r, p = int(slot["n"]), int(slot["r"]), int(slot["p"])
        if 128 * n * r * p > _MAX_MEMORY:
            raise ValueError("scrypt cost out of range")
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)
    if kdf == "argon2id":
        m, t, p = int(slot["m"]), int(slot["t"]), int(slot["p"])
        if not (8 * p <= m <= _MAX_MEMORY // 1024 and 1 <= t <= 64 and 1 <= p <= 64):
            raise ValueError("argon2id cost out of range")
        return Argon2id(salt=salt, length=32, iterations=t, lanes=p, memory_cost=m).derive(secret)
    raise ValueError(f"unknown kdf {kdf!r}")


def _aad(repo_id: str, slot_id: str) -> bytes:
    return f"blockbackup key slot {repo_id} {slot_id}".encode()


def make_slot(
    master: bytes,
    secret: bytes,
    kind: str,
    repo_id: str,
    slot_id: str,
    comment: str = "",
    kdf: str = DEFAULT_KDF,
) -> dict[str, Any]:
    """A key slot (JSON-able) that gives back ``master`` to whoever knows ``secret``."""
    if kind not in SLOT_KINDS:
        raise RepositoryError(f"unknown key slot kind {kind!r}")
    params = _kdf_params(kdf)
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    key = _slot_key(secret, salt, {"kdf": kdf, **params})
    wrapped = AESGCM(key).encrypt(nonce, master, _aad(repo_id, slot_id))
    return {
        "version": SLOT_VERSION,
        "kind": kind,
        "kdf": kdf,
        **params,
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
    if slot.get("version") != SLOT_VERSION or slot.get("kdf") not in KDFS:
        raise RepositoryError(f"key slot {slot_id} has an unsupported version or kdf")
    return slot


def open_slot(slot: dict[str, Any], secret: bytes, repo_id: str, slot_id: str) -> bytes | None:
    """The master key if ``secret`` opens this slot, else None."""
    try:
        key = _slot_key(secret, _unb64(slot["salt"]), slot)
        return AESGCM(key).decrypt(
            _unb64(slot["nonce"]), _unb64(slot["wrapped"]), _aad(repo_id, slot_id)
        )
    except InvalidTag:
        return None
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptData(f"key slot {slot_id} is damaged: {exc}") from None


#: Unlocks started ahead of their use (:func:`unlock_ahead`), each taken once.
_ahead: dict[bytes, Future[tuple[bytes, str]]] = {}


def unlock_ahead(slots: dict[str, dict[str, Any]], secret: bytes, repo_id: str) -> None:
    """Start :func:`unlock` in a thread; an :func:`unlock` with the same slots, secret and
    repository then takes its outcome (once: the master key, or the error) instead of
    deriving again.

    For a command line process, which opens the repository right after importing the
    engine: the key derivation (~0.1 s of Argon2id, in C, without the GIL) then overlaps
    the imports. A daemon does not call it, so it never holds a key nobody asked for."""
    future: Future[tuple[bytes, str]] = Future()
    _ahead[_ahead_key(slots, secret, repo_id)] = future

    def run() -> None:
        try:
            future.set_result(_unlock(slots, secret, repo_id))
        except Exception as exc:  # the unlock that takes it raises it, as its own
            future.set_exception(exc)

    threading.Thread(target=run, name="bb-unlock-ahead", daemon=True).start()


def _ahead_key(slots: dict[str, dict[str, Any]], secret: bytes, repo_id: str) -> bytes:
    what = json.dumps([slots, repo_id], sort_keys=True).encode()
    return hashlib.sha256(what).digest() + hashlib.sha256(secret).digest()


def unlock(slots: dict[str, dict[str, Any]], secret: bytes, repo_id: str) -> tuple[bytes, str]:
    """(master key, slot id) from the first slot ``secret`` opens, else :class:`WrongKey`
    (or the outcome of the same unlock started ahead)."""
    ahead = _ahead.pop(_ahead_key(slots, secret, repo_id), None)
    if ahead is not None:
        return ahead.result()
    return _unlock(slots, secret, repo_id)


def _unlock(slots: dict[str, dict[str, Any]], secret: bytes, repo_id: str) -> tuple[bytes, str]:
    for slot_id, slot in sorted(slots.items()):
        master = open_slot(slot, secret, repo_id, slot_id)
        if master is not None:
            return master, slot_id
    raise WrongKey("wrong passphrase or key file: no key slot of this repository opens with it")
