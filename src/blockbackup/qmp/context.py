"""What a command handler can reach: the daemon's state, and per-request hooks.

Why a separate object: the same handlers serve QMP sessions and the daemon's command line
(``--blockdev`` runs the ``blockdev-add`` handler), so they must not depend on a session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from blockbackup.block.graph import Graph
from blockbackup.events import EventBus
from blockbackup.jobs.job import JobManager
from blockbackup.nbd.exports import ExportManager
from blockbackup.nbd.server import NbdServer
from blockbackup.qmp.registry import Registry

__all__ = ["Context", "Services"]


@dataclass(eq=False)
class Services:
    """The daemon-wide objects commands act on."""

    graph: Graph
    events: EventBus
    jobs: JobManager
    exports: ExportManager
    nbd: NbdServer
    registry: Registry
    #: Ask the daemon to shut down (``quit``); returns at once.
    request_shutdown: Callable[[], None]
    #: Serialises command execution across monitors, as QEMU's main loop does.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class Context:
    """One command execution: the services plus hooks run after the reply is sent."""

    services: Services
    after_reply: list[Callable[[], None]] = field(default_factory=list)
