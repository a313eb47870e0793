"""X.509 TLS credentials in QEMU's directory layout, as Python ``ssl`` contexts.

Why: QEMU names TLS credentials by object id (``tls-creds-x509,id=tls0,dir=...,
endpoint=server``) and both ``nbd-server-start`` and the ``nbd`` block driver refer to them
by that id. :class:`TlsCredentials` is that object; the graph's object registry
(:mod:`blockbackup.block.objects`) keeps it by id.

Directory layout (QEMU's): ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem`` for a
server, ``client-cert.pem``, ``client-key.pem`` for a client (optional unless the server
verifies peers).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from blockbackup.errors import BlockBackupError

__all__ = ["TlsCredentials"]


class TlsCredentials:
    """``tls-creds-x509``: certificates in ``dir`` for one endpoint.

    :param dir: the credentials directory.
    :param endpoint: ``"server"`` or ``"client"``.
    :param verify_peer: a server requires (and checks) client certificates; a client
        checks the server's certificate against ``ca-cert.pem``.
    :raise BlockBackupError: on a bad endpoint or unreadable files.
    """

    def __init__(
        self, dir: str | Path, *, endpoint: str = "server", verify_peer: bool = True
    ) -> None:
        if endpoint not in ("server", "client"):
            raise BlockBackupError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        self.dir = Path(dir)
        self.endpoint = endpoint
        self.verify_peer = verify_peer
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"<TlsCredentials {str(self.dir)!r} endpoint={self.endpoint}>"

    def _file(self, name: str, required: bool = True) -> str | None:
        path = self.dir / name
        if not path.exists():
            if required:
                raise BlockBackupError(f"Unable to access credentials {path}: No such file")
            return None
        return str(path)

    def context(self) -> ssl.SSLContext:
        """The SSL context for this endpoint (built once)."""
        if self._context is None:
            try:
                self._context = (
                    self._server_context() if self.endpoint == "server" else self._client_context()
                )
            except (OSError, ssl.SSLError) as exc:
                raise BlockBackupError(f"Unable to load TLS credentials: {exc}") from exc
        return self._context

    def _server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert = self._file("server-cert.pem")
        key = self._file("server-key.pem")
        assert cert is not None
        assert key is not None
        ctx.load_cert_chain(cert, key)
        if self.verify_peer:
            ca = self._file("ca-cert.pem")
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ca = self._file("ca-cert.pem", required=self.verify_peer)
        if ca is not None:
            ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        cert = self._file("client-cert.pem", required=False)
        key = self._file("client-key.pem", required=False)
        if cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
        return ctx
