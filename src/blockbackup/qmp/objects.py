"""User-creatable objects (``object-add``/``--object``): secrets and TLS credentials.

Why a registry: other parts refer to objects by id (``tls-creds=tls0`` on the NBD server or
the ``nbd`` block driver, ``password-secret=sec0``), so objects live here and are looked up
by id and kind. TLS credentials are also published to :mod:`blockbackup.nbd.tls`, where
the NBD code looks them up.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from blockbackup.block import throttle_groups
from blockbackup.errors import BlockBackupError
from blockbackup.nbd import tls

__all__ = ["ObjectRegistry", "Secret"]


@dataclass(frozen=True, slots=True)
class Secret:
    """A ``secret`` object: bytes given inline or read from a file."""

    id: str
    data: bytes


class ObjectRegistry:
    """Objects by id."""

    def __init__(self) -> None:
        self._objects: dict[str, object] = {}

    def get(self, id: str) -> object | None:
        return self._objects.get(id)

    def secret(self, id: str) -> Secret:
        obj = self._objects.get(id)
        if not isinstance(obj, Secret):
            raise BlockBackupError(f"No secret with id '{id}'")
        return obj

    def tls_credentials(self, id: str, endpoint: str) -> tls.TlsCredentials:
        """The ``tls-creds-x509`` object ``id`` for ``endpoint`` (QEMU's texts)."""
        obj = self._objects.get(id)
        if not isinstance(obj, tls.TlsCredentials):
            raise BlockBackupError(f"No TLS credentials with id '{id}'")
        if obj.endpoint != endpoint:
            raise BlockBackupError(f"Expecting TLS credentials with a {endpoint} endpoint")
        return obj

    def add(self, qom_type: str, id: str, props: dict[str, Any]) -> object:
        """``object-add`` with validated properties."""
        if id in self._objects:
            raise BlockBackupError(
                f"attempt to add duplicate property '{id}' to object (type 'container')"
            )
        obj: object
        if qom_type == "secret":
            obj = self._make_secret(id, props)
        elif qom_type == "throttle-group":
            obj = throttle_groups.create_group(id, props)
        elif qom_type == "tls-creds-x509":
            creds = tls.TlsCredentials(
                props.get("dir", ""),
                endpoint=props.get("endpoint", "client"),
                verify_peer=props.get("verify-peer", True),
            )
            if "dir" not in props:
                raise BlockBackupError("Unable to access credentials: no 'dir' given")
            creds.context()  # load now: bad files fail the command
            tls.unregister_credentials(id)
            tls.register_credentials(id, creds)
            obj = creds
        else:
            raise BlockBackupError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        self._objects[id] = obj
        return obj

    @staticmethod
    def _make_secret(id: str, props: dict[str, Any]) -> Secret:
        data, path = props.get("data"), props.get("file")
        if data is not None and path is not None:
            raise BlockBackupError("'data' and 'file' are mutually exclusive")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as exc:
                raise BlockBackupError(
                    f"Unable to read {path}: Failed to open file “{path}”: {exc.strerror}"
                ) from exc
        elif data is not None:
            raw = str(data).encode()
        else:
            raise BlockBackupError("Either 'file' or 'data' must be provided")
        if props.get("format", "raw") == "base64":
            try:
                raw = base64.b64decode(raw, validate=True)
            except ValueError as exc:
                raise BlockBackupError(f"Unable to decode secret {id}: {exc}") from exc
        return Secret(id, raw)

    def delete(self, id: str) -> None:
        """``object-del``."""
        obj = self._objects.get(id)
        if obj is None:
            raise BlockBackupError(f"object '{id}' not found")
        if isinstance(obj, throttle_groups.ThrottleGroup):
            throttle_groups.delete_group(id)  # refused while in use
        del self._objects[id]
        if isinstance(obj, tls.TlsCredentials):
            tls.unregister_credentials(id)

    def close(self) -> None:
        for id, obj in list(self._objects.items()):
            if isinstance(obj, throttle_groups.ThrottleGroup):
                throttle_groups.delete_group(id, force=True)
                del self._objects[id]
            else:
                self.delete(id)
