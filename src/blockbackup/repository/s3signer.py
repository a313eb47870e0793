"""Signing a pack's PUT without hashing its 16 MiB again: its name is its SHA-256.

Why: SigV4 signs a hash of the body (``x-amz-content-sha256``), and botocore computes it
over every PUT body on plain HTTP (and over HTTPS without a checksum header): SHA-256 of
every pack, which the packer has just computed to name it (``data/xx/<sha256>``). That
second hash was 0.24 s of a 512 MiB backup's 0.45 s of extra client CPU on S3 against a
directory. The request that goes out is the same one, byte for byte: the same header,
the same signature. A pack whose bytes did not match its name (a bug) is refused by a
server that checks the hash (AWS, MinIO, Ceph) instead of being stored under a wrong name.

How: a ``before-parameter-build`` handler notes the name of a pack's PUT in the request
context, and a ``choose-signer`` handler picks a SigV4 signer that takes the noted hash
instead of computing it. Other requests are signed as before.
"""

from __future__ import annotations

import re
from typing import Any

import botocore.auth
from botocore.auth import S3SigV4Auth

#: The object key of a pack (after any repository prefix): ``data/<2 hex>/<sha256 hex>``.
_PACK_KEY = re.compile(r"(?:^|/)data/[0-9a-f]{2}/([0-9a-f]{64})$")
_CONTEXT_KEY = "bb_body_sha256"
_SIGNER = "bb-s3v4-named-body"


class _NamedBodyAuth(S3SigV4Auth):
    """S3's SigV4, with the body hash noted in the request context when there is one
    (and no flexible checksum, which would change what the payload hash covers)."""

    def payload(self, request: Any) -> str:
        known = request.context.get(_CONTEXT_KEY)
        if known is None or request.context.get("checksum", {}).get("request_algorithm"):
            return str(super().payload(request))
        return str(known)


def _note_pack_hash(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    match = _PACK_KEY.search(str(params.get("Key", "")))
    if match is not None and isinstance(params.get("Body"), bytes | bytearray):
        context[_CONTEXT_KEY] = match.group(1)


def _choose_signer(signature_version: str, context: dict[str, Any], **_: Any) -> str | None:
    if _CONTEXT_KEY in context and signature_version in ("v4", "s3v4"):
        return _SIGNER
    return None  # botocore's own choice


def sign_packs_by_name(client: Any) -> None:
    """Make ``client`` sign pack PUTs with their names as body hashes."""
    botocore.auth.AUTH_TYPE_MAPS.setdefault(_SIGNER, _NamedBodyAuth)
    events = client.meta.events
    events.register("before-parameter-build.s3.PutObject", _note_pack_hash)
    events.register("choose-signer.s3.PutObject", _choose_signer)


__all__ = ["sign_packs_by_name"]
