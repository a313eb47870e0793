"""User-creatable objects (``object-add``/``--object``) of one graph: secrets, TLS
credentials and throttle groups.

Why the graph owns them: nodes refer to objects by id in their options
(``throttle-group=tg0`` on a ``throttle`` node, ``tls-creds=tls0`` on an ``nbd`` node) and
find them through ``opts.graph.objects``; the daemon's NBD server finds its ``tls-creds``
in the same registry. Two graphs in one process (two daemons, or library users) each have
their own objects, so the same id in both never conflicts and ``object-del`` in one never
reaches the other.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from blockbackup.block.throttle_groups import ThrottleGroup, create_group
from blockbackup.errors import BlockBackupError
from blockbackup.nbd.tls import TlsCredentials

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

    def tls_credentials(self, id: str, endpoint: str) -> TlsCredentials:
        """The ``tls-creds-x509`` object ``id`` for ``endpoint`` (QEMU's texts)."""
        obj = self._objects.get(id)
        if not isinstance(obj, TlsCredentials):
            raise BlockBackupError(f"No TLS credentials with id '{id}'")
        if obj.endpoint != endpoint:
            raise BlockBackupError(f"Expecting TLS credentials with a {endpoint} endpoint")
        return obj

    def throttle_group(self, id: str) -> ThrottleGroup | None:
        """The ``throttle-group`` object ``id``, if there is one."""
        obj = self._objects.get(id)
        return obj if isinstance(obj, ThrottleGroup) else None

    def add(self, qom_type: str, id: str, props: dict[str, Any]) -> object:
        """``object-add`` with validated properties."""
        self._check_new(id)
        obj: object
        if qom_type == "secret":
            obj = self._make_secret(id, props)
        elif qom_type == "throttle-group":
            obj = create_group(id, props)
        elif qom_type == "tls-creds-x509":
            creds = TlsCredentials(
                props.get("dir", ""),
                endpoint=props.get("endpoint", "client"),
                verify_peer=props.get("verify-peer", True),
            )
            if "dir" not in props:
                raise BlockBackupError("Unable to access credentials: no 'dir' given")
            creds.context()  # load now: bad files fail the command
            obj = creds
        else:
            raise BlockBackupError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        self._objects[id] = obj
        return obj

    def insert(self, id: str, obj: Secret | TlsCredentials | ThrottleGroup) -> None:
        """Add an object made by the caller (a throttle group with its own clock, say)."""
        self._check_new(id)
        self._objects[id] = obj

    def _check_new(self, id: str) -> None:
        if id in self._objects:
            raise BlockBackupError(
                f"attempt to add duplicate property '{id}' to object (type 'container')"
            )

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
        """``object-del``: refused for a throttle group that a ``throttle`` node uses."""
        obj = self._objects.get(id)
        if obj is None:
            raise BlockBackupError(f"object '{id}' not found")
        if isinstance(obj, ThrottleGroup) and obj.members:
            raise BlockBackupError(f"object '{id}' is in use, can not be deleted")
        del self._objects[id]

    def close(self) -> None:
        """Forget every object (the graph is closed: no node uses them any more)."""
        self._objects.clear()
