"""X.509 test certificates in QEMU's ``tls-creds-x509`` directory layout, made by openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def make_certs(d: Path) -> bool:
    """A CA and server/client certificates in QEMU's layout in ``d``; False without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return False

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
        "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=test ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{role}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        )
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem",
            "-out", f"{role}.csr", "-subj", f"/CN={role}")  # fmt: skip
        run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{role}-cert.pem", "-days", "2",
            "-extfile", f"{role}.ext")  # fmt: skip
    return True
