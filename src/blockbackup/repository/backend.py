"""Object-store-shaped storage: the only thing the repository logic knows about where bytes go.

Why this shape: a repository must live on a local directory and on S3 (issue 15) with the
same logic above. So the protocol has only what an object store offers (whole-object atomic
put, conditional put, ranged get, list by prefix, delete, head) and the logic above relies
on nothing else: no rename, no locks, no atime, no listing order.
"""

from __future__ import annotations

import os
import secrets
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

from blockbackup.repository import directio
from blockbackup.repository.errors import AlreadyExists, NotFound, RepositoryError

TMP_PREFIX = ".tmp-"


class Backend(Protocol):
    """Objects by ``/``-separated key. Every method is blocking (run it in a thread)."""

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def get_buffer(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        into: directio.ReadBuffer | None = None,
    ) -> bytes | memoryview:
        """As :meth:`get`, for large reads of pack data (a restore's runs of chunks, a
        verify's whole pack): the bytes may come as a view of a buffer the backend filled
        its own way (a directory: past the page cache), ``into``'s memory if it likes
        (the caller's, reused for its next read)."""
        ...

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """The local file that holds ``key`` (None: not a local file), for a helper process
        that reads it by itself (a restore's decoders)."""
        ...

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview) -> None: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def delete(self, key: str) -> None: ...

    def size(self, key: str) -> int | None: ...

    def exists(self, key: str) -> bool: ...

    def modified(self, key: str) -> float | None:
        """The object's last-modified time as the backend stamps it (POSIX seconds; S3
        LastModified), None if absent. gc compares these only with each other, never with
        a host clock: a put's stamp is no later than the moment the object is visible."""
        ...

    def describe(self) -> str: ...

    def close(self) -> None:
        """Give back what the backend holds (connections, threads) once nobody uses it:
        a daemon opens and closes repositories for as long as it runs. Idempotent."""
        ...


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or p.startswith(TMP_PREFIX) for p in parts):
        raise RepositoryError(f"invalid object key {key!r}")


class DirectoryBackend:
    """Objects as files under a root directory; every put is atomic and durable.

    put: temp file in the final directory, fsync, rename, fsync the directory (a large
    object, a pack, bypasses the page cache: :mod:`~blockbackup.repository.directio`).
    put_if_absent: the same temp file linked to the key (``link`` refuses an existing
    name, so of two writers exactly one wins), then the temp name is removed.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def close(self) -> None:
        pass  # every call opens and closes its own files

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            return self._read(self._path(key), offset, length)
        except FileNotFoundError:
            raise NotFound(f"object {key} is missing from {self.root}") from None

    def get_buffer(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        into: directio.ReadBuffer | None = None,
    ) -> bytes | memoryview:
        """A large range is read past the page cache (:func:`directio.read`)."""
        path = self._path(key)
        try:
            direct = directio.read(path, offset, length, into)
            return direct if direct is not None else self._read(path, offset, length)
        except FileNotFoundError:
            raise NotFound(f"object {key} is missing from {self.root}") from None

    @staticmethod
    def _read(path: Path, offset: int, length: int | None) -> bytes:
        with open(path, "rb") as f:
            if offset:
                f.seek(offset)
            return f.read() if length is None else f.read(length)

    def _write_temp(self, path: Path, data: bytes | bytearray | memoryview) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        fd = directio.open_new(tmp, memoryview(data).nbytes)
        try:
            directio.write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    @staticmethod
    def _sync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._sync_dir(path.parent)

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExists(f"object {key} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_dir(path.parent)

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root)
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    yield (rel / name).as_posix()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def modified(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def remove_temporaries(self, before: float) -> int:
        """Delete the temporary files of killed puts last written before ``before`` (a
        time from :meth:`modified`); how many. Not in the protocol: an object store
        keeps no half-written objects."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    continue
                path = Path(dirpath) / name
                try:
                    if path.stat().st_mtime < before:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


#: Objects fetched at once by :func:`get_many` from a remote backend.
FETCHERS = 16


def get_many(backend: Backend, keys: list[str]) -> Iterator[tuple[str, bytes | None]]:
    """Each key's object (None: gone meanwhile), in the order given; from a remote backend
    ``FETCHERS`` at a time, at most four times that many ahead of the caller.

    Why: opening a repository, gc and a listing of snapshots read one small object per
    pack or snapshot; one GET after another, 1,000 of them behind 20 ms of latency took
    67 s (4.5 s 16 at a time). A failure drops the GETs not begun and leaves no thread."""

    def get(key: str) -> bytes | None:
        try:
            return backend.get(key)
        except NotFound:
            return None

    return _each(backend, keys, get)


def exists_many(backend: Backend, keys: list[str]) -> Iterator[tuple[str, bool]]:
    """Whether each key exists, in the order given, asked as :func:`get_many` reads (a
    commit checks every pack its snapshot uses: one HEAD after another cost a round trip
    each)."""
    return _each(backend, keys, backend.exists)


T = TypeVar("T")


def _each(backend: Backend, keys: list[str], ask: Callable[[str], T]) -> Iterator[tuple[str, T]]:
    """``(key, ask(key))`` in the order of ``keys``: on a remote backend ``FETCHERS`` at a
    time, at most four times that many ahead of the caller; a failure drops the calls not
    begun and leaves no thread."""
    if not getattr(backend, "remote", False) or len(keys) < 2:
        yield from ((key, ask(key)) for key in keys)
        return
    pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="bb-fetch")
    try:
        pending: deque[tuple[str, Future[T]]] = deque()
        for key in keys:
            pending.append((key, pool.submit(ask, key)))
            if len(pending) >= 4 * FETCHERS:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def open_backend(location: str, options: Mapping[str, str | None] | None = None) -> Backend:
    """The backend for a repository location: ``s3://bucket/prefix`` or a directory.

    ``options`` are the storage settings (``endpoint``, ``region``, ``addressing-style``)
    from flags or node options; they mean nothing for a directory.
    """
    if location.startswith("s3://"):
        from blockbackup.repository.s3backend import open_s3  # lazy: boto3 start-up cost

        return open_s3(location, options)
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise RepositoryError(f"repository scheme {scheme}:// is not supported (s3:// is)")
    return DirectoryBackend(location)


def is_remote(location: str) -> bool:
    """Whether ``location`` names object storage (not a local directory)."""
    return location.startswith("s3://")
