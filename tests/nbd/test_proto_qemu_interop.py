"""Interop: our sans-IO ClientConnection against a real ``qemu-nbd``.

Why: in-memory pairs only prove our two roles agree with each other; this
proves the client speaks the same wire format as QEMU. The test does the I/O
itself over a blocking Unix socket.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from blockbackup.nbd.proto import (
    NEED_DATA,
    ClientConnection,
    ClientFlags,
    ConnectionClosed,
    Event,
    Info,
    NegotiatedExport,
    OptGo,
    OptionAck,
    OptSetMetaContext,
    OptStructuredReply,
    RequestDone,
    ServerGreeting,
)
from blockbackup.nbd.proto.wire import Buffer

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed"),
    pytest.mark.timeout(30),
]

SIZE = 1024 * 1024


class Driver:
    """Blocking socket I/O around a ClientConnection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = ClientConnection()

    def send(self, event: Event) -> None:
        self.sock.sendall(b"".join(bytes(p) for p in self.conn.send(event)))

    def send_parts(self, parts: list[Buffer]) -> None:
        for part in parts:
            self.sock.sendall(part)

    def next(self) -> Event:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                assert isinstance(ev, Event)
                return ev
            self.conn.receive_data(self.sock.recv(65536))

    def until_done(self, cookie: int) -> RequestDone:
        while True:
            ev = self.next()
            if isinstance(ev, RequestDone) and ev.cookie == cookie:
                return ev


@pytest.fixture
def qemu_nbd(tmp_path: Path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SIZE))
    sock_path = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "--socket", str(sock_path), "--format=raw", "--export-name=disk", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.skip(f"qemu-nbd did not start: {err}")
            time.sleep(0.02)
        yield sock_path
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_client_against_qemu_nbd(qemu_nbd: Path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        for _ in range(200):  # the socket file appears at bind(), before listen()
            try:
                sock.connect(str(qemu_nbd))
                break
            except ConnectionRefusedError:
                time.sleep(0.02)
        d = Driver(sock)
        greeting = d.next()
        assert isinstance(greeting, ServerGreeting)
        d.send(ClientFlags())
        d.send(OptStructuredReply())
        assert d.next() == OptionAck()
        d.send(OptSetMetaContext(export_name="disk", queries=("base:allocation",)))
        replies = []
        while (ev := d.next()) != OptionAck():
            replies.append(ev)
        assert [r.name for r in replies] == ["base:allocation"]  # type: ignore[attr-defined]
        d.send(OptGo(name="disk", info_requests=(Info.BLOCK_SIZE,)))
        while not isinstance(ev := d.next(), NegotiatedExport):
            pass
        export = ev
        assert export.size == SIZE
        assert export.structured_replies
        assert list(export.meta_contexts.values()) == ["base:allocation"]

        payload = bytes(range(256)) * 16
        cookie, parts = d.conn.write(8192, payload)
        d.send_parts(parts)
        assert d.until_done(cookie).error is None

        cookie, parts = d.conn.read(4096, 8192)
        d.send_parts(parts)
        done = d.until_done(cookie)
        assert done.error is None
        assert bytes(done.data) == bytes(4096) + payload  # type: ignore[arg-type]

        cookie, parts = d.conn.block_status(0, SIZE)
        d.send_parts(parts)
        done = d.until_done(cookie)
        assert done.error is None
        (extents,) = done.extents.values()
        assert sum(e.length for e in extents) >= 1
        assert all(e.length > 0 for e in extents)

        cookie, parts = d.conn.flush()
        d.send_parts(parts)
        assert d.until_done(cookie).error is None

        d.send_parts(d.conn.disconnect())
        d.conn.receive_data(b"")
        assert d.conn.next_event() == ConnectionClosed()
