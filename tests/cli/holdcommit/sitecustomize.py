"""Loaded by one gc test's backup (on its PYTHONPATH): once the backup's data is stored and
it is about to commit, it says so in ``$BB_TEST_HELD`` and waits, so the test can kill it
at that exact point (a killed backup's marker and data, never a race with a fast backup).
Test-only; nothing in blockbackup reads it."""

from __future__ import annotations

import os
import time

from blockbackup.repository import repo as _repo

_commit = _repo.Repository.commit


def _held(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    with open(os.environ["BB_TEST_HELD"], "w") as f:
        f.write("held")
    time.sleep(120)
    return _commit(self, *args, **kwargs)


_repo.Repository.commit = _held  # type: ignore[method-assign]
