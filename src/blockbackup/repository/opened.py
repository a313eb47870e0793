"""One opened repository for all the target nodes of a graph that write into it.

Why: a repository node used to open the repository for itself: its key derivation, its
writer marker and its table of every stored chunk (then about 210 bytes a chunk). A live
backup of N disks (a target node each) opened it N times: on a repository of 1,000,000
chunks, four target nodes took 835 MiB and 5.9 s to open, one 210 MiB and 1.5 s
(measured). Target nodes of one graph that name the same repository (and storage
options) with the same secret now share one :class:`Repository`:

- one writer marker, announced before the table is loaded (gc's protocol needs exactly
  that of every table a writer deduplicates against) and retired by the last node to
  close, so it covers every node that uses the table;
- one table and one chunk store, so one lock: the store's, which every node that shares
  it takes for its writes and flushes (each node still counts what it stored itself:
  ``Counts``);
- the commit still re-checks every pack its disks name, so a snapshot never names a
  pack gc removed, whichever node's write relied on it.

An entry lives only while a node uses it: the next backup opens (and loads) afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from blockbackup.repository.repo import Repository

#: What makes two nodes' repositories the same: the location, the storage options, and
#: a digest of the secret (a node with another secret opens, and is refused, by itself).
Key = tuple[str, tuple[tuple[str, str], ...], bytes]


@dataclass(eq=False)
class Shared:
    """An opened writer repository and its users."""

    repo: Repository
    #: Taken around every use of the store (and of a node's own disk index with it).
    lock: threading.Lock
    users: int = 1


class _Scope:
    """The shared repositories of one graph (one event loop)."""

    def __init__(self) -> None:
        self.open: dict[Key, Shared] = {}
        self.opening: dict[Key, asyncio.Lock] = {}


_scopes: weakref.WeakKeyDictionary[object, _Scope] = weakref.WeakKeyDictionary()


def key_of(location: str, storage: dict[str, str | None], secret: bytes | None) -> Key:
    options = tuple(sorted((k, v) for k, v in storage.items() if v is not None))
    return location, options, b"" if secret is None else hashlib.sha256(secret).digest()


async def acquire(scope: object, key: Key, opener: Callable[[], Awaitable[Repository]]) -> Shared:
    """The repository ``key`` names, shared in ``scope`` (a graph): the one already open,
    or a new one from ``opener`` (which announces the writer and loads the table)."""
    state = _scopes.get(scope)
    if state is None:
        state = _scopes[scope] = _Scope()
    lock = state.opening.setdefault(key, asyncio.Lock())
    async with lock:  # a second node waits for the first one's opening, then shares it
        shared = state.open.get(key)
        if shared is not None:
            shared.users += 1
            return shared
        shared = Shared(await opener(), threading.Lock())
        state.open[key] = shared
        return shared


def release(scope: object, shared: Shared) -> bool:
    """One user less; True when it was the last (the caller then retires the writer)."""
    shared.users -= 1
    if shared.users > 0:
        return False
    state = _scopes.get(scope)
    if state is not None:
        for key, known in list(state.open.items()):
            if known is shared:
                del state.open[key]
    return True
