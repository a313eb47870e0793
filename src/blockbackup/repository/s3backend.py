"""The repository on S3-compatible object storage (AWS, MinIO, Ceph RGW, Garage, rclone).

The same calls as the directory backend (``backend.Backend``), each one S3 request:
GET (ranged), PUT, PUT with ``If-None-Match: *``, ListObjectsV2, DELETE, HEAD.

Why these choices:
- Retries: botocore's *standard* mode (exponential backoff with full jitter, at most
  ``max_attempts`` attempts, a retry quota) covers throttling (SlowDown, 503), 5xx, timeouts
  and connection resets. It does not cover a body cut short after the headers arrived, so
  ``get`` checks the length it got against the length it asked for and retries itself, with
  the same bound. Each attempt has a connect and read timeout, so a call's total time is
  bounded (about ``max_attempts * (2 * timeout + 20 s)``).
- Conditional puts: ``put_if_absent`` asks HEAD first (cheap, and the only protection on
  servers that ignore ``If-None-Match``, such as ``rclone serve s3`` 1.75), then PUTs with
  ``If-None-Match: *`` (race-free where honoured: AWS since 2024, MinIO, Ceph), then reads
  a small object back and compares (a concurrent writer that won on a server ignoring the
  condition is then detected by the loser). The window that remains (two writers whose
  PUTs and read-backs interleave exactly) only matters for ``config`` at ``repo init``:
  key slots and snapshot names carry random parts and never collide.
- Request economy and latency: every HTTP attempt is counted by kind (``requests()``);
  small reads of packs go through shared read-ahead spans, and puts of packs and their
  indexes run behind the packer (``s3pipeline``), so a restore costs one or two GETs per
  pack, not one per 64 KiB chunk, and a backup hashes the next pack while the last one
  uploads.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, cast

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.handlers import add_expect_header
from urllib3.exceptions import HTTPError as Urllib3Error

from blockbackup.repository import directio, s3config
from blockbackup.repository.errors import AlreadyExists, NotFound, RepositoryError
from blockbackup.repository.s3pipeline import ReadAhead, Span

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_OPS = {
    "GetObject": "GET",
    "PutObject": "PUT",
    "HeadObject": "HEAD",
    "ListObjectsV2": "LIST",
    "DeleteObject": "DELETE",
}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
#: Read-back after a conditional put only for objects this small (config, key slots,
#: manifests, markers); packs and indexes are named by their content.
_READ_BACK_LIMIT = 1 << 20
#: Spans streamed for read-ahead arrive in pieces of this size (a reader of the start of a
#: span goes on before the rest is in).
_STREAM_CHUNK = 1 << 20
#: Body errors botocore's retries do not see (they happen after the response headers).
_BODY_ERRORS = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, Urllib3Error)


_SESSIONS: list[boto3.session.Session] = []
_SESSION_LOCK = threading.Lock()


def _session() -> boto3.session.Session:
    """One session per process: its service models load once, not per client."""
    with _SESSION_LOCK:
        if not _SESSIONS:
            _SESSIONS.append(boto3.session.Session())
        return _SESSIONS[0]


class RequestCounter:
    """HTTP attempts by kind (GET, PUT, HEAD, LIST, DELETE) and bytes each way; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class _BufferBody:
    """A buffer as botocore reads a body (the SigV4 hash, then the send, a piece at a time;
    seeking back for a retry), without the copy of it whole that ``bytes`` would make:
    16 MiB of fresh memory per pack, two packs at once. Valid while the PUT runs."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view) - self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = (
            len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        )
        piece = self._view[self._pos : end].tobytes()
        self._pos = max(self._pos, end)
        return piece

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class S3Backend:
    """Objects under ``s3://bucket/prefix/``. Thread-safe (boto3 clients are)."""

    #: Read-ahead for small ranged reads under ``data/`` (0 disables it): the window a
    #: first read fetches, and how many windows' worth of spans are kept. Measured, cold
    #: restore of a 1 GiB image from the local server, 4 alternating pairs: 16 windows
    #: 2.00-2.20 s at 167-186 MB peak RSS (up to 213 MB in other runs), 10 windows
    #: 1.97-2.18 s at 147-157 MB; 4 windows was slower (2.22-2.34 s).
    READ_AHEAD = 4 << 20
    READ_AHEAD_SLOTS = 10

    def __init__(self, location: s3config.S3Location) -> None:
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        #: A remote backend: worth a local cache of immutable objects (``cache.py``).
        self.remote = True
        self.counter = RequestCounter()
        config = Config(
            region_name=location.region,
            retries={"mode": "standard", "max_attempts": location.max_attempts},
            connect_timeout=location.timeout,
            read_timeout=location.timeout,
            max_pool_connections=32,
            s3={"addressing_style": "path" if location.addressing_style == "path" else "virtual"},
            # Whole-object checksums on ranged GETs fail on servers that send the full
            # object's checksum with a range (rclone); integrity is the repository's own
            # (pack names are SHA-256 of their bytes, blobs are authenticated).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        self.client: S3Client = _session().client(
            "s3", endpoint_url=location.endpoint, config=config
        )
        self.client.meta.events.register("before-send.s3", self._count)
        # A body read in pieces (_BufferBody) would get "Expect: 100-continue": a round trip
        # more per PUT, to spare sending a body the server refuses (rare).
        self.client.meta.events.unregister("before-call.s3", add_expect_header)
        self._readahead = ReadAhead(
            self._stream, self.READ_AHEAD, self.READ_AHEAD * self.READ_AHEAD_SLOTS
        )

    def close(self) -> None:
        """Let streamed reads end, then hang up the pooled connections (a daemon's nodes
        open a backend each; the garbage collector would close them only some time
        later)."""
        self._readahead.close()
        self.client.close()

    def _count(self, event_name: str = "", **_kwargs: Any) -> None:
        self.counter.add(_OPS.get(event_name.rsplit(".", 1)[-1], "OTHER"))

    def requests(self) -> dict[str, int]:
        """Requests sent so far by kind (every attempt, retries included)."""
        return self.counter.snapshot()

    def describe(self) -> str:
        return self.location.describe()

    def _key(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise RepositoryError(f"invalid object key {key!r}")
        return self.prefix + key

    def _error(self, exc: Exception, what: str) -> RepositoryError:
        """One line a user can act on, for a request that failed after its retries."""
        where = self.describe()
        if isinstance(exc, NoCredentialsError):
            return RepositoryError(
                f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE)"
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return RepositoryError(f"{where}: bucket {self.bucket} does not exist")
            if code in _DENIED:
                return RepositoryError(f"{where}: access denied ({code}): check the credentials")
            message = exc.response.get("Error", {}).get("Message") or code
            return RepositoryError(f"{where}: {what} failed: {message}")
        return RepositoryError(f"{where}: {what} failed: {exc}")

    # -- the protocol ---------------------------------------------------------------------

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        if (
            length is not None
            and self.READ_AHEAD
            and key.startswith("data/")
            and length < self.READ_AHEAD
        ):
            return self._readahead.read(key, offset, length)
        span = Span(key, offset, length)
        self._fill(key, offset, length, span, exact=True)
        span.finish()
        return span.read(offset, length if length is not None else 1 << 62)

    def local_path(self, key: str) -> None:
        return None

    def get_buffer(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        into: directio.ReadBuffer | None = None,
    ) -> bytes | memoryview:
        return self.get(key, offset, length)

    def _stream(self, span: Span) -> None:
        self._fill(span.key, span.start, span.limit, span, exact=False, chunk=_STREAM_CHUNK)

    def _fill(
        self,
        key: str,
        offset: int,
        length: int | None,
        span: Span,
        exact: bool,
        chunk: int | None = None,
    ) -> None:
        """GET a range (to the object's end when ``length`` is None) into ``span``, in
        pieces of ``chunk`` bytes as they arrive (None: the whole body at once). A body
        cut short (after the headers: botocore's retries do not see it) is resumed where it
        stopped, as is a short range when ``exact`` (the object is immutable, so a short
        answer can only be a transfer that broke), with the same bound on attempts; if the
        object really ends there, the resumed range is refused and the span stays short
        (the caller's length check names the damage)."""
        name = self._key(key)
        got = 0
        delay = 0.2
        for attempt in range(1, self.location.max_attempts + 1):
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
            first = offset + got
            if first or length is not None:
                end = "" if length is None else str(offset + length - 1)
                args["Range"] = f"bytes={first}-{end}"
            try:
                response = self.client.get_object(**args)
                total = response.get("ContentRange", "").rpartition("/")[2]
                if got == 0:
                    span.begin(int(total) if total.isdigit() else None)
                announced = response.get("ContentLength")
                body, before = response["Body"], got
                while data := body.read(chunk):
                    span.add(data)
                    got += len(data)  # kept when the body breaks: resume after it
                if announced is not None and got - before != announced:
                    raise IncompleteReadError(actual_bytes=got - before, expected_bytes=announced)
                if exact and length is not None and got != length:
                    raise IncompleteReadError(actual_bytes=got, expected_bytes=length)
                return
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _NOT_FOUND:
                    raise NotFound(f"object {key} is missing from {self.describe()}") from None
                if code == "InvalidRange":
                    return
                raise self._error(exc, f"GET {key}") from None
            except _BODY_ERRORS as exc:
                if attempt == self.location.max_attempts:
                    raise self._error(exc, f"GET {key}") from None
                self.counter.add("retried-body")
                time.sleep(delay * (0.5 + _jitter()))
                delay = min(delay * 2, 10.0)
            except BotoCoreError as exc:
                raise self._error(exc, f"GET {key}") from None
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Waits for the PUT: the chunk store's writer threads already put two packs at
        once while the next one fills (a queue of puts behind them held a copy of each
        queued pack: 4 x 16 MiB, and was slower, measured in docs/performance.md). The
        body is read from ``data`` in pieces, not copied whole first."""
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=cast("IO[bytes]", _BufferBody(data))
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"PUT {key}") from None

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview) -> None:
        body = bytes(data)
        if self.exists(key):
            raise AlreadyExists(f"object {key} already exists")
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*"
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _PRECONDITION or status in (409, 412):
                # our own earlier attempt may have landed (its answer lost, botocore retried)
                if self._holds(key, body):
                    return
                raise AlreadyExists(f"object {key} already exists") from None
            raise self._error(exc, f"PUT {key}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"PUT {key}") from None
        if len(body) <= _READ_BACK_LIMIT and not self._holds(key, body):
            raise AlreadyExists(f"object {key} already exists (another writer won)")

    def _holds(self, key: str, body: bytes) -> bool:
        """Whether ``key`` now holds exactly ``body`` (small objects only; the bodies that
        need this carry random parts, so equal bytes mean this writer's own)."""
        if len(body) > _READ_BACK_LIMIT:
            return False
        try:
            return self.get(key) == body
        except NotFound:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"LIST {prefix or '/'}") from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in _NOT_FOUND:
                raise self._error(exc, f"DELETE {key}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"DELETE {key}") from None

    def _head(self, key: str) -> Mapping[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                return None
            raise self._error(exc, f"HEAD {key}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"HEAD {key}") from None

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def modified(self, key: str) -> float | None:
        """The server's last-modified time of ``key`` (POSIX seconds), None if absent: the
        only clock gc trusts (never a host's)."""
        head = self._head(key)
        if head is None:
            return None
        stamp = head["LastModified"]
        return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)


def _jitter() -> float:
    return random.random()


def open_s3(location: str, options: Mapping[str, str | None] | None = None) -> S3Backend:
    return S3Backend(s3config.resolve(location, options))


__all__ = ["RequestCounter", "S3Backend", "open_s3"]
