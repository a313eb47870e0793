"""Overlapping S3 requests with the work around them: read-ahead windows, write-behind puts.

Why: a request to object storage has latency a local file does not, and the repository's
reader and packer are sequential at heart (one chunk, one pack at a time). So:

- ``ReadAhead``: a small read of a pack is served from an aligned window (``window`` bytes,
  one ranged GET) shared by concurrent readers (one request per window, never one per
  reader); when a reader moves on to the next window of the same pack, the next few are
  fetched in the background. Windows of immutable objects (packs never change under their
  name) are always right. Random reads (a mounted disk) pay at most one window per miss.
- ``WriteBehind``: the PUT of a pack and then of its index runs in the background while the
  packer fills the next pack (at most ``depth`` puts queued: bounded memory). Order is kept
  where it matters: a pack's index is put only after the pack succeeded, and every other
  call (a snapshot's conditional put, an existence check, a read, a listing) first waits
  for all queued puts. A failed put is sticky: every later call raises it, so nothing is
  ever committed on top of a pack that did not arrive.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from blockbackup.repository.errors import RepositoryError


class ReadAhead:
    def __init__(
        self,
        fetch: Callable[[str, int, int], tuple[bytes, int | None]],
        window: int,
        slots: int,
        workers: int = 3,
        ahead: int = 3,
    ) -> None:
        self._fetch = fetch
        self.window = window
        self.slots = slots
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, int], Future[bytes]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._sizes: dict[str, int] = {}  # object sizes learned from Content-Range
        self._workers = workers
        self.ahead = ahead

    def _future(self, key: str, start: int) -> tuple[Future[bytes], bool]:
        """The window's future, and whether the caller must fetch it (first asker)."""
        with self._lock:
            found = self._windows.get((key, start))
            if found is not None:
                self._windows.move_to_end((key, start))
                return found, False
            future: Future[bytes] = Future()
            self._windows[(key, start)] = future
            while len(self._windows) > self.slots:
                self._windows.popitem(last=False)
            return future, True

    def _load(self, key: str, start: int, future: Future[bytes]) -> None:
        try:
            data, total = self._fetch(key, start, self.window)
            if total is not None:
                with self._lock:
                    self._sizes[key] = total
            future.set_result(data)
        except BaseException as exc:
            with self._lock:
                if self._windows.get((key, start)) is future:
                    del self._windows[(key, start)]  # not cached: the next reader retries
            future.set_exception(exc)

    def _window(self, key: str, start: int) -> bytes:
        future, mine = self._future(key, start)
        if mine:
            self._load(key, start, future)
        return future.result()

    def _prefetch(self, key: str, start: int) -> None:
        future, mine = self._future(key, start)
        if not mine:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="bb-s3-readahead")
        self._pool.submit(self._load, key, start, future)

    def read(self, key: str, offset: int, length: int) -> bytes:
        first = offset // self.window * self.window
        last = (offset + length - 1) // self.window * self.window
        parts = []
        for start in range(first, last + self.window, self.window):
            data = self._window(key, start)
            parts.append(data)
            if len(data) < self.window:
                break  # the end of the object
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(parts[-1]) == self.window:
            with self._lock:
                sequential = (key, last - self.window) in self._windows or first != last
                size = self._sizes.get(key)
            for n in range(1, self.ahead + 1) if sequential else ():
                nxt = last + n * self.window
                if size is not None and nxt >= size:
                    break
                self._prefetch(key, nxt)
        return joined[offset - first : offset - first + length]


class WriteBehind:
    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="bb-s3-put")
        self._slots = threading.BoundedSemaphore(depth * 2)
        self._lock = threading.Lock()
        self._pending: set[Future[None]] = set()
        self._by_name: dict[str, Future[None]] = {}
        self._error: BaseException | None = None

    def _raise(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, RepositoryError):
                raise RepositoryError(str(error)) from None
            raise RepositoryError(f"an earlier upload failed: {error}") from None

    def submit(self, name: str, put: Callable[[], None], after: str | None = None) -> None:
        """Run ``put`` in the background (after the put named ``after``, if queued)."""
        self._raise()
        self._slots.acquire()
        with self._lock:
            before = self._by_name.get(after) if after else None

        def task() -> None:
            try:
                if before is not None:
                    before.result()
                if self._error is None:
                    put()
            except BaseException as exc:
                with self._lock:
                    if self._error is None:
                        self._error = exc
                raise
            finally:
                self._slots.release()

        future = self._pool.submit(task)
        with self._lock:
            self._pending.add(future)
            self._by_name[name] = future
        future.add_done_callback(lambda f: self._done(name, f))

    def _done(self, name: str, future: Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)
            if self._by_name.get(name) is future:
                del self._by_name[name]

    def barrier(self) -> None:
        """Wait for every queued put; raise the first failure (sticky)."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            for future in pending:
                try:
                    future.result()
                except BaseException:
                    pass
        self._raise()


__all__ = ["ReadAhead", "WriteBehind"]
