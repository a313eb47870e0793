"""Reserve a fleece image's worst case on disk before the guest depends on it.

QEMU 7.2's backup job has no ``on-cbw-error``: when a copy-before-write copy cannot be
stored, the *guest's* write fails. So the fleece image's file is extended with
``posix_fallocate`` to the disk's whole size plus its qcow2 metadata before the job
starts. qcow2 allocates new clusters from its refcounts (the lowest free cluster), not at
the end of the file, so every copy lands inside blocks already allocated: the image
never needs a byte more from the file system (checked with qemu-io on a full tmpfs, and
by tests/vm/test_vm_backup.py).
"""

from __future__ import annotations

import errno
import os

from blockbackup.vm.qemu import VmError

#: The fleece image's cluster size (create_qcow2_file's default).
CLUSTER = 65536
#: Headroom for the header, L1 and refcount tables, and rounding.
SLACK = 4 << 20


def reservation(size: int) -> int:
    """Bytes a qcow2 of virtual ``size`` may take when every cluster is written: the data,
    an 8-byte L2 entry and a 2-byte refcount per cluster (counted generously), the rest."""
    return size + size // 4096 + SLACK


def reserve(path: str, size: int, *, scratch: str, disk: str) -> None:
    """Allocate ``reservation(size)`` bytes of ``path``; one clear line when there is no room."""
    need = reservation(size)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, need)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VmError(
                f"scratch {scratch} has no room for the copy-before-write image of {disk} "
                f"(needs {need} bytes): use --scratch-dir"
            ) from None
        raise VmError(
            f"cannot reserve the copy-before-write image of {disk} in {scratch}: "
            f"{exc.strerror or exc}"
        ) from None
    finally:
        os.close(fd)
