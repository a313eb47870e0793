"""The job tables: which status may follow which, and which verbs each status accepts.

Pure data and pure functions (no asyncio), kept in one module so the rules live in one
place, as QEMU keeps them in ``JobSTT`` and ``JobVerbTable``. Letters used below:
C created, R running, P paused, Y ready, S standby, W waiting, D pending, X aborting,
E concluded, N null (U undefined is a job that was never registered).

Transitions (anything else is a bug, raised as :class:`IllegalTransition`)::

    U -> C          C -> R X N      R -> P Y W X    P -> R
    Y -> S W X      S -> Y          W -> D X        D -> X E
    X -> X E        E -> N          N -> (nothing)

Verbs (anything else is a user error, :func:`check_verb`)::

    cancel                          C R P Y S W D
    pause resume set-speed change   C R P Y S
    complete                        Y S   (backup never reaches either)
    finalize                        D
    dismiss                         E

The error policy (``on-source-error``/``on-target-error``) maps to an action in the single
function :func:`error_action`, as ``block_job_error_action`` does in QEMU.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from enum import StrEnum

from blockbackup.errors import BlockBackupError


class JobStatus(StrEnum):
    """QEMU's ``JobStatus`` values, in QEMU's order."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(StrEnum):
    """QEMU's ``JobVerb`` values (the user commands a job may refuse)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"
    CHANGE = "change"


class BlockdevOnError(StrEnum):
    """The ``on-source-error``/``on-target-error`` policy."""

    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class ErrorAction(StrEnum):
    """What a job does about one I/O error (the ``action`` of ``BLOCK_JOB_ERROR``)."""

    IGNORE = "ignore"
    REPORT = "report"
    STOP = "stop"


class IoStatus(StrEnum):
    """A block job's ``io-status``."""

    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


class IllegalTransition(AssertionError):
    """A status change that the transition table forbids: always a bug in the caller."""


_S = JobStatus

TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    _S.UNDEFINED: frozenset({_S.CREATED}),
    _S.CREATED: frozenset({_S.RUNNING, _S.ABORTING, _S.NULL}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.READY, _S.WAITING, _S.ABORTING}),
    _S.PAUSED: frozenset({_S.RUNNING}),
    _S.READY: frozenset({_S.STANDBY, _S.WAITING, _S.ABORTING}),
    _S.STANDBY: frozenset({_S.READY}),
    _S.WAITING: frozenset({_S.PENDING, _S.ABORTING}),
    _S.PENDING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.ABORTING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.CONCLUDED: frozenset({_S.NULL}),
    _S.NULL: frozenset(),
}

_ACTIVE = frozenset({_S.CREATED, _S.RUNNING, _S.PAUSED, _S.READY, _S.STANDBY})

VERBS: Mapping[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ACTIVE | {_S.WAITING, _S.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.COMPLETE: frozenset({_S.READY, _S.STANDBY}),
    JobVerb.FINALIZE: frozenset({_S.PENDING}),
    JobVerb.DISMISS: frozenset({_S.CONCLUDED}),
    JobVerb.CHANGE: _ACTIVE,
}


def check_transition(old: JobStatus, new: JobStatus) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`TRANSITIONS`."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"illegal job status transition {old} -> {new}")


def check_verb(job_id: str, status: JobStatus, verb: JobVerb) -> None:
    """Raise QEMU's error unless a job in ``status`` accepts ``verb``."""
    if status not in VERBS[verb]:
        raise BlockBackupError(
            f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'"
        )


def error_action(policy: BlockdevOnError, err: int, is_read: bool) -> ErrorAction:
    """Map an error policy and an errno to what the job does.

    ``enospc`` and ``auto`` stop on ENOSPC (so the user can grow the target and resume)
    and report anything else. ``is_read`` does not change the action; it is taken so
    callers pass the whole error context in one place, as QEMU does.
    """
    del is_read
    match policy:
        case BlockdevOnError.ENOSPC | BlockdevOnError.AUTO:
            return ErrorAction.STOP if err == errno.ENOSPC else ErrorAction.REPORT
        case BlockdevOnError.STOP:
            return ErrorAction.STOP
        case BlockdevOnError.IGNORE:
            return ErrorAction.IGNORE
        case BlockdevOnError.REPORT:
            return ErrorAction.REPORT
