"""blockbackup: live, point-in-time backups of disk images, controlled like qemu-storage-daemon."""

from __future__ import annotations

__version__ = "0.1.0"
