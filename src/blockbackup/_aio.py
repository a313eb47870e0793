"""Blocking system calls off the event loop, in two thread pools.

The event loop never blocks on a disk. Every blocking call (``preadv``, ``pwritev``,
``copy_file_range``, ``fallocate``, ``fdatasync``, ``lseek``) runs in a thread pool. There are
two pools so that guest I/O never queues behind a backup's background copy: code running in
a background job marks its context with :func:`background_io`, and its calls go to the
background pool; everything else (NBD clients, copy-before-write on the guest path) uses
the foreground pool. (The file driver runs a few calls on the loop thread when it can
show they are bounded and cheap: see :mod:`blockbackup.block.drivers.file`.)

Why not ``loop.run_in_executor``: a round trip through ``concurrent.futures`` costs a
``concurrent.futures.Future``, a callback chain into an asyncio future and one self-pipe
write per completion. Here workers take plain tuples from a ``SimpleQueue`` and hand
results back to the loop in batches: a worker appends to the loop's inbox and wakes the
loop only when the inbox was empty, so calls completing together cost one wakeup.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import contextvars
import functools
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

FOREGROUND_THREADS = 16
BACKGROUND_THREADS = 8

_background: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "blockbackup_background_io", default=False
)


class _Inbox:
    """Results for one event loop, delivered by one callback per batch."""

    __slots__ = ("__weakref__", "_done", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = collections.deque()
        self._scheduled = False

    def post(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        """Called by a worker: queue a result; wake the loop unless a delivery is due."""
        self._done.append((fut, ok, value))
        if not self._scheduled:
            self._scheduled = True
            # The loop may be closed (a test ended while a call ran): drop the result.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        # Reset the flag before draining: a result posted from now on either is drained
        # below or schedules another delivery.
        self._scheduled = False
        done = self._done
        while done:
            fut, ok, value = done.popleft()
            if fut.done():  # the caller was cancelled; the call ran anyway
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


_Item = tuple[Callable[[], Any], asyncio.Future[Any], _Inbox]


class _Pool:
    """Up to ``size`` daemon threads taking calls from one queue, started on demand."""

    def __init__(self, size: int, prefix: str) -> None:
        self._size = size
        self._prefix = prefix
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)

    def submit(self, item: _Item) -> None:
        self._queue.put(item)
        if self._idle.acquire(timeout=0):
            return
        if len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            call, fut, inbox = item
            try:
                result = call()
            except BaseException as exc:  # delivered to the awaiting task
                inbox.post(fut, False, exc)
            else:
                inbox.post(fut, True, result)
            del item, call, fut, inbox
            self._idle.release()

    def shutdown(self, timeout: float) -> None:
        """Let the workers finish their calls and exit (at interpreter exit)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)


_pools: dict[bool, _Pool] = {}
_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()


def _pool(background: bool) -> _Pool:
    pool = _pools.get(background)
    if pool is None:
        size = BACKGROUND_THREADS if background else FOREGROUND_THREADS
        prefix = "bb-bg-io" if background else "bb-fg-io"
        pool = _pools[background] = _Pool(size, prefix)
    return pool


def _shutdown() -> None:
    for pool in list(_pools.values()):
        pool.shutdown(5.0)


def _forget_after_fork() -> None:
    # A forked child has none of the parent's threads.
    _pools.clear()
    _inboxes.clear()


atexit.register(_shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)


@contextlib.contextmanager
def background_io() -> Iterator[None]:
    """Send this context's blocking calls (and its new tasks') to the background pool."""
    token = _background.set(True)
    try:
        yield
    finally:
        _background.reset(token)


def in_background() -> bool:
    """Whether the current context does background (job) I/O."""
    return _background.get()


_no_yield: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "blockbackup_no_inline_yield", default=False
)


@contextlib.contextmanager
def without_inline_yields() -> Iterator[None]:
    """I/O done inline on the loop thread need not yield in this context.

    Inline I/O yields once per call so that a task looping on it cannot starve the loop.
    A copy-before-write runs inside a guest write that suspends soon anyway; each yield
    there costs the guest a whole loop iteration (about 1 ms under load, measured).
    """
    token = _no_yield.set(True)
    try:
        yield
    finally:
        _no_yield.reset(token)


def inline_may_skip_yield() -> bool:
    """Whether the current context asked for :func:`without_inline_yields`."""
    return _no_yield.get()


async def run_blocking(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call in the pool that matches the current context's priority."""
    loop = asyncio.get_running_loop()
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes[loop] = _Inbox(loop)
    fut: asyncio.Future[T] = loop.create_future()
    call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
    _pool(_background.get()).submit((call, fut, inbox))
    return await fut


async def run_undoable(fn: Callable[[], T], undo: Callable[[T], object]) -> T:
    """``fn()`` in a thread; if the caller is cancelled meanwhile, wait for the call to end
    and ``undo`` what it made (in a thread too) before the cancellation is raised.

    Why: a cancelled ``await asyncio.to_thread(...)`` returns at once while the call goes
    on. A signal that stopped a backup while it announced itself as a repository writer
    left the marker behind: the clean-up ran before the thread had written it.
    """
    call = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        try:
            made = await call
        except Exception:
            raise asyncio.CancelledError from None  # it failed: nothing to undo
        await asyncio.to_thread(undo, made)
        raise
