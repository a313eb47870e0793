"""Loaded by the randomized test's subprocesses (on their PYTHONPATH): widens the window
between a commit's re-check and its manifest write, where a gc that ignored the rules
would delete a pack the new snapshot names. Test-only; nothing in blockbackup reads it."""

from __future__ import annotations

import random
import time

from blockbackup.repository import repo as _repo

_checked = _repo.Repository._refused_packs


def _slow(self, disks, relied):  # type: ignore[no-untyped-def]
    missing = _checked(self, disks, relied)
    time.sleep(random.uniform(0, 1.2))
    return missing


_repo.Repository._refused_packs = _slow  # type: ignore[method-assign]
