"""Block drivers. Importing this package registers every driver by its name."""

from __future__ import annotations

from blockbackup.block.drivers import blkdebug, file, null, raw
from blockbackup.block.drivers import nbd as _nbd  # noqa: F401  (registers nbd)
from blockbackup.block.filters import copy_before_write, snapshot_access, throttle
from blockbackup.block.qcow2 import driver as _qcow2  # noqa: F401  (registers qcow2)

__all__ = ["blkdebug", "copy_before_write", "file", "null", "raw", "snapshot_access", "throttle"]
