"""What blockbackup names inside a QEMU, and how it recognises its own.

Everything a run creates in QEMU carries the run id: nodes, the job, the copy-before-write
filter and the export are ``bbvm-<run>-<n>...``, the run's scratch directory is
``bbvm-<run>``. The next run removes every ``bbvm-`` object it finds (the monitor serves
one client at a time, so whatever it finds was left by a run that is gone). Checkpoints
(persistent dirty bitmaps in the VM's qcow2 images) are ``bb-<time>-<run>``; a bitmap of
any other name is never touched.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

#: Nodes, jobs, exports and scratch directories of a run.
OBJECT_PREFIX = "bbvm-"
#: The file in a run's scratch directory naming the QMP socket it belongs to.
OWNER_FILE = "qmp-socket"
#: The NBD server's socket in a run's scratch directory.
NBD_SOCKET = "nbd.sock"

_CHECKPOINT = re.compile(r"^bb-\d{8}T\d{6}-[0-9a-f]{8}$")
_RUN_DIR = re.compile(r"^bbvm-[0-9a-f]{8}$")


def new_run_id() -> str:
    return secrets.token_hex(4)


def run_prefix(run: str) -> str:
    """The prefix of every QEMU object of run ``run``."""
    return f"{OBJECT_PREFIX}{run}-"


def run_dir_name(run: str) -> str:
    return f"{OBJECT_PREFIX}{run}"


def is_run_dir_name(name: str) -> bool:
    return bool(_RUN_DIR.match(name))


def checkpoint_name(run: str, now: datetime | None = None) -> str:
    """A new checkpoint's bitmap name: when it was made, and by which run."""
    now = now or datetime.now(UTC)
    return f"bb-{now:%Y%m%dT%H%M%S}-{run}"


def is_checkpoint(name: str | None) -> bool:
    """Whether a bitmap is one of blockbackup's checkpoints (only those are ever removed)."""
    return name is not None and bool(_CHECKPOINT.match(name))


def is_ours(name: str | None) -> bool:
    """Whether a node, job or export was made by a ``vm backup`` run."""
    return name is not None and name.startswith(OBJECT_PREFIX)
