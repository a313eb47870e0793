"""Unix sockets are published owner-only and already listening; nothing else is replaced."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from blockbackup._sockets import bind_unix, parse_socket_address
from blockbackup.errors import BlockBackupError


def test_listening_when_it_appears_and_owner_only(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    server = bind_unix(path)
    try:
        # No listen() here: the file only appears once the socket listens, so a client
        # that sees it can connect (a plain bind + listen races: ECONNREFUSED).
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.close()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary name left behind
    finally:
        server.close()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays: a daemon that died
    server = bind_unix(path)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.close()
    finally:
        server.close()


def test_other_files_are_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("precious")
    with pytest.raises(BlockBackupError, match="Address already in use"):
        bind_unix(str(path))
    assert path.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_bind_failure_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "s"
    with pytest.raises(BlockBackupError, match="Failed to bind socket to"):
        bind_unix(str(missing))
    assert os.listdir(tmp_path) == []


def test_parse_socket_address() -> None:
    assert parse_socket_address({"type": "inet", "host": "::1", "port": "10809"}) == {
        "type": "inet",
        "host": "::1",
        "port": "10809",
    }
    assert parse_socket_address({"type": "inet", "data": {"port": "1"}})["host"] == "127.0.0.1"
    with pytest.raises(BlockBackupError, match="does not accept value 'vsock'"):
        parse_socket_address({"type": "vsock", "cid": "3"})
