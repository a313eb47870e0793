"""The job tables, checked exhaustively against an independent transcription of QEMU's."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockbackup.errors import BlockBackupError
from blockbackup.jobs.status import (
    TRANSITIONS,
    VERBS,
    BlockdevOnError,
    ErrorAction,
    IllegalTransition,
    JobStatus,
    JobVerb,
    check_transition,
    check_verb,
    error_action,
)

LETTER = {
    "U": JobStatus.UNDEFINED,
    "C": JobStatus.CREATED,
    "R": JobStatus.RUNNING,
    "P": JobStatus.PAUSED,
    "Y": JobStatus.READY,
    "S": JobStatus.STANDBY,
    "W": JobStatus.WAITING,
    "D": JobStatus.PENDING,
    "X": JobStatus.ABORTING,
    "E": JobStatus.CONCLUDED,
    "N": JobStatus.NULL,
}
# Written from the reference, independently of the module under test.
LEGAL_PAIRS = {
    (LETTER[a], LETTER[b])
    for a, bs in {
        "U": "C",
        "C": "RXN",
        "R": "PYWX",
        "P": "R",
        "Y": "SWX",
        "S": "Y",
        "W": "DX",
        "D": "XE",
        "X": "XE",
        "E": "N",
        "N": "",
    }.items()
    for b in bs
}
ACCEPTS = {
    JobVerb.CANCEL: "CRPYSWD",
    JobVerb.PAUSE: "CRPYS",
    JobVerb.RESUME: "CRPYS",
    JobVerb.SET_SPEED: "CRPYS",
    JobVerb.CHANGE: "CRPYS",
    JobVerb.COMPLETE: "YS",
    JobVerb.FINALIZE: "D",
    JobVerb.DISMISS: "E",
}


def test_enum_values_are_qemus() -> None:
    assert [s.value for s in JobStatus] == [
        "undefined", "created", "running", "paused", "ready", "standby",
        "waiting", "pending", "aborting", "concluded", "null",
    ]  # fmt: skip
    assert [v.value for v in JobVerb] == [
        "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss", "change",
    ]  # fmt: skip
    assert set(TRANSITIONS) == set(JobStatus)
    assert set(VERBS) == set(JobVerb)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobStatus, JobStatus)))
def test_every_transition(old: JobStatus, new: JobStatus) -> None:
    if (old, new) in LEGAL_PAIRS:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
            check_transition(old, new)


@pytest.mark.parametrize(("status", "verb"), list(itertools.product(JobStatus, JobVerb)))
def test_every_verb(status: JobStatus, verb: JobVerb) -> None:
    legal = status in {LETTER[c] for c in ACCEPTS[verb]}
    if legal:
        check_verb("job0", status, verb)
        return
    with pytest.raises(BlockBackupError) as info:
        check_verb("job0", status, verb)
    assert str(info.value) == (
        f"Job 'job0' in state '{status.value}' cannot accept command verb '{verb.value}'"
    )
    assert info.value.error_class == "GenericError"


def test_observed_verb_error_text() -> None:
    with pytest.raises(BlockBackupError) as info:
        check_verb("job0", JobStatus.RUNNING, JobVerb.COMPLETE)
    assert str(info.value) == "Job 'job0' in state 'running' cannot accept command verb 'complete'"


def test_illegal_transition_is_an_assertion() -> None:
    assert issubclass(IllegalTransition, AssertionError)
    assert not issubclass(IllegalTransition, BlockBackupError)


ERRNOS = st.sampled_from([errno.EIO, errno.ENOSPC, errno.EINVAL, errno.EACCES, errno.EPERM])


@given(policy=st.sampled_from(BlockdevOnError), err=ERRNOS, is_read=st.booleans())
def test_error_action(policy: BlockdevOnError, err: int, is_read: bool) -> None:
    expected = {
        BlockdevOnError.REPORT: ErrorAction.REPORT,
        BlockdevOnError.IGNORE: ErrorAction.IGNORE,
        BlockdevOnError.STOP: ErrorAction.STOP,
        BlockdevOnError.ENOSPC: ErrorAction.STOP if err == errno.ENOSPC else ErrorAction.REPORT,
        BlockdevOnError.AUTO: ErrorAction.STOP if err == errno.ENOSPC else ErrorAction.REPORT,
    }[policy]
    assert error_action(policy, err, is_read) is expected
