"""gc's condemned markers: ``gc/condemned/<pack>``, the objects that say "this pack may go".

Why a marker object and not a flag in the pack: packs are immutable and named by their
content, and every party (gc, a writer's commit, the loader) must be able to ask "is this
pack condemned?" with one list or head. The marker's backend time is what gc compares with
writers' start times (docs/repository.md, "Concurrency without locks").
"""

from __future__ import annotations

from blockbackup.repository.backend import Backend

PREFIX = "gc/condemned/"


def marker_key(pack: str) -> str:
    return PREFIX + pack


def listed(backend: Backend) -> set[str]:
    """Every pack that carries a condemned marker now (one listing)."""
    return {key.rsplit("/", 1)[1] for key in backend.list(PREFIX)}
