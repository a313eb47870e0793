"""Blocking system calls off the event loop, in two thread pools.

The event loop never blocks on a disk. Every blocking call (``preadv``, ``pwritev``,
``copy_file_range``, ``fallocate``, ``fdatasync``, ``lseek``) runs in a thread pool. There are
two pools so that guest I/O never queues behind a backup's background copy: code running in
a background job marks its context with :func:`background_io`, and its calls go to the
background pool; everything else (NBD clients, copy-before-write on the guest path) uses
the foreground pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

FOREGROUND_THREADS = 16
BACKGROUND_THREADS = 8

_background: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "blockbackup_background_io", default=False
)
_pools: dict[bool, ThreadPoolExecutor] = {}


def _pool(background: bool) -> ThreadPoolExecutor:
    pool = _pools.get(background)
    if pool is None:
        size = BACKGROUND_THREADS if background else FOREGROUND_THREADS
        prefix = "bb-bg-io" if background else "bb-fg-io"
        pool = _pools[background] = ThreadPoolExecutor(size, thread_name_prefix=prefix)
    return pool


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


async def run_blocking(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call in the pool that matches the current context's priority."""
    loop = asyncio.get_running_loop()
    call = functools.partial(fn, *args, **kwargs)
    return await loop.run_in_executor(_pool(_background.get()), call)
