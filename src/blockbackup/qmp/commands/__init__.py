"""The QMP commands, one module per area; importing this package declares them all.

Why one module per area: each area's handlers map onto one part of the core (graph,
jobs, backup, exports, objects), and the declarations beside them are the single source
of argument checking and introspection.
"""

from __future__ import annotations

from blockbackup.qmp.commands import (
    backup,
    bitmaps,
    block,
    control,
    exports,
    jobs,
    objects,
    repository,
    transaction,
)

__all__ = [
    "backup",
    "bitmaps",
    "block",
    "control",
    "exports",
    "jobs",
    "objects",
    "repository",
    "transaction",
]
