"""An HTTP proxy in front of the S3 server that counts requests and injects faults.

Faults (``Fault.kind``): ``503`` (SlowDown), ``500`` (InternalError), ``reset`` (the
connection closed with RST, no response), ``timeout`` (no response for ``delay`` seconds),
``truncate`` (the response's headers promise the whole body, half of it is sent, then the
connection closes), ``reset-after`` (the request reaches the server, the response is
lost), ``412-after`` (it reaches the server, the client is told PreconditionFailed: a
retried conditional put whose first attempt had landed).
A fault applies to requests matching ``method`` and ``contains`` (a substring of the
path), ``times`` times. ``down`` makes every request fail with a reset (a lost link).
Every request is logged (method, path, bytes in, bytes out, status) for the tests' counts.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


@dataclass
class Fault:
    kind: str
    method: str | None = None
    contains: str | None = None
    times: int = 1
    delay: float = 5.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.contains is None or self.contains in path
        )


@dataclass
class Entry:
    method: str
    path: str
    sent: int
    received: int
    status: int  # 0: a fault with no response


@dataclass
class FaultProxy:
    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    log: list[Entry] = field(default_factory=list)
    down: bool = False
    #: Probability of a random transient fault on each request (randomized tests).
    random_rate: float = 0.0
    random_kinds: tuple[str, ...] = ("503", "500", "reset", "truncate")
    #: Seconds added before each request is forwarded (a distant server).
    latency: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    #: Client connections open now (a client that hung up is no longer counted).
    connections: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(1234))

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.log.clear()
            self.down = False
            self.random_rate = 0.0
            self.latency = 0.0

    def entries(self) -> list[Entry]:
        with self.lock:
            return list(self.log)

    def count(self, method: str | None = None, contains: str | None = None) -> int:
        return sum(
            1
            for e in self.entries()
            if (method is None or e.method == method) and (contains is None or contains in e.path)
        )

    def bytes_sent(self, method: str = "PUT", contains: str | None = None) -> int:
        """Request body bytes that reached the server (requests that got a 2xx answer)."""
        return sum(
            e.sent
            for e in self.entries()
            if e.method == method
            and 200 <= e.status < 300
            and (contains is None or contains in e.path)
        )

    def _pick(self, method: str, path: str) -> Fault | None:
        with self.lock:
            if self.down:
                return Fault("reset")
            for fault in self.faults:
                if fault.times > 0 and fault.matches(method, path):
                    fault.times -= 1
                    return fault
            if self.random_rate and self._rng.random() < self.random_rate:
                kind = self._rng.choice(self.random_kinds)
                if kind == "truncate" and method != "GET":
                    kind = "503"
                return Fault(kind)
        return None

    def record(self, entry: Entry) -> None:
        with self.lock:
            self.log.append(entry)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _reset(self) -> None:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            def _error(self, status: int, code: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected {code}</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                method, path = self.command, self.path
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:  # the client went away mid-request
                    proxy.record(Entry(method, path, len(body), 0, 0))
                    self.close_connection = True
                    return
                fault = proxy._pick(method, path)
                kind = fault.kind if fault else None
                if kind in ("503", "500"):
                    proxy.record(Entry(method, path, len(body), 0, int(kind)))
                    self._error(int(kind), "SlowDown" if kind == "503" else "InternalError")
                    return
                if kind == "reset":
                    proxy.record(Entry(method, path, len(body), 0, 0))
                    self._reset()
                    return
                if kind == "timeout":
                    proxy.record(Entry(method, path, len(body), 0, 0))
                    time.sleep(fault.delay if fault else 5.0)
                    self._reset()
                    return
                if proxy.latency:
                    time.sleep(proxy.latency)
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                upstream.request(method, path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if kind == "412-after":  # it landed, but the client hears "exists"
                    proxy.record(Entry(method, path, len(body), 0, 412))
                    self._error(412, "PreconditionFailed")
                    return
                if kind == "reset-after":
                    proxy.record(Entry(method, path, len(body), 0, 0))
                    self._reset()
                    return
                proxy.record(Entry(method, path, len(body), len(data), response.status))
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                announced = response.getheader("Content-Length")
                if method == "HEAD" and announced is not None:
                    self.send_header("Content-Length", announced)
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method == "HEAD":
                    return
                if kind == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client killed mid-request (the tests do that on purpose)

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                with proxy.lock:  # one thread per connection, for as long as it is open
                    proxy.connections += 1
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    with proxy.lock:
                        proxy.connections -= 1

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
