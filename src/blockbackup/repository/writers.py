"""Writer markers: ``writers/<id>``, put before a writer loads the index, deleted after it
committed or failed.

Why: gc must never delete a pack that a running backup may rely on, without a lock and
without a grace period. A marker blocks nobody; its backend time W says "this writer may
rely on anything condemned after W", so gc defers deleting those packs while it exists
(docs/repository.md). A marker whose writer is gone is harmless but defers gc: a marker of
this host whose process provably ended is removed by gc; one older than 24 h (a dead host)
is ignored and reported, and ``gc --forget-writer ID`` drops one.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from blockbackup.repository.backend import Backend
from blockbackup.repository.errors import NotFound

PREFIX = "writers/"
#: ``writers-alive/<id>``: re-put by a long writer, so its marker (whose time must stay W)
#: is not taken for a dead host's after 24 h.
ALIVE_PREFIX = "writers-alive/"
#: A writer whose marker and heartbeat are older than this (backend time) is taken for a
#: dead host's and ignored.
STALE_AFTER = 24 * 3600.0
#: How often a writer re-puts its heartbeat (by its own monotonic clock: pacing only).
HEARTBEAT = 3600.0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (pid reuse gives another)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def identity() -> dict[str, Any]:
    """What lets a gc on this host tell later whether this process still runs."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": _pidns(),
        "pid": pid,
        "start": _start_ticks(pid),
    }


def announce(backend: Backend) -> str:
    """Put a new writer marker; its id."""
    writer_id = secrets.token_hex(8)
    backend.put(PREFIX + writer_id, json.dumps(identity()).encode())
    return writer_id


def beat(backend: Backend, writer_id: str) -> None:
    """Say "still running" without touching the marker's time."""
    backend.put(ALIVE_PREFIX + writer_id, b"")


def retire(backend: Backend, writer_id: str) -> None:
    backend.delete(PREFIX + writer_id)
    backend.delete(ALIVE_PREFIX + writer_id)


@dataclass
class Writer:
    id: str
    time: float
    info: dict[str, Any] = field(default_factory=dict)
    #: The heartbeat's backend time, if the writer ever beat.
    alive: float | None = None

    def last_seen(self) -> float:
        return max(self.time, self.alive or self.time)

    def provably_dead(self) -> bool:
        """True only when this host can tell the process is gone: same host, same boot,
        same pid namespace, and no process with that pid and start time."""
        me = identity()
        info = self.info
        if not me["boot_id"] or not info.get("start"):
            return False
        if (info.get("host"), info.get("boot_id"), info.get("pidns")) != (
            me["host"],
            me["boot_id"],
            me["pidns"],
        ):
            return False
        return bool(_start_ticks(int(info.get("pid", 0))) != info["start"])

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "alive": self.alive, **self.info}


def listed(backend: Backend) -> list[Writer]:
    """Every writer marker now, with its backend time."""
    out = []
    for key in backend.list(PREFIX):
        writer_id = key.removeprefix(PREFIX)
        time = backend.modified(key)
        if time is None:
            continue  # retired meanwhile
        try:
            info = json.loads(backend.get(key))
        except (NotFound, ValueError):
            info = {}
        alive = backend.modified(ALIVE_PREFIX + writer_id)
        out.append(Writer(writer_id, time, info if isinstance(info, dict) else {}, alive))
    return out
