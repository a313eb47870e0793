"""Whether a disk's next backup may be an incremental, and from which checkpoint.

An incremental is correct only if the checkpoint bitmap holds every write since the point
in time of the snapshot it is based on. That is true when the latest snapshot of the disk
in the repository recorded this checkpoint (made in the same transaction as that
snapshot's point in time), and QEMU still has it, recording, consistent, on the same image
of the same size. Anything else is a full backup with the reason in one sentence: never a
wrong incremental, and never a refusal that would block the next backup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockbackup.vm.names import is_checkpoint
from blockbackup.vm.qemu import Disk

FULL = "full"
INCREMENTAL = "incremental"


@dataclass
class Previous:
    """The latest snapshot of a disk in the repository: its id and the disk's record."""

    snapshot: str
    size: int
    source: dict[str, Any]


@dataclass
class Plan:
    """What a disk's backup will be."""

    mode: str
    #: The checkpoint the incremental starts from (None for a full backup).
    checkpoint: str | None
    #: The snapshot an incremental's disk index starts from.
    base: str | None
    #: Why a full backup (None for an incremental); shown to the user.
    reason: str | None
    #: Whether the reason is a fallback worth a message (not "first backup", not --full).
    fallback: bool = False


def can_keep_checkpoint(disk: Disk) -> bool:
    """Persistent bitmaps need a qcow2 image."""
    return disk.format == "qcow2"


def plan(disk: Disk, previous: Previous | None, *, full: bool, granularity: int) -> Plan:
    def full_backup(reason: str, fallback: bool = True) -> Plan:
        return Plan(FULL, None, None, reason, fallback)

    if full:
        return full_backup("--full was given", fallback=False)
    if previous is None:
        return full_backup("no earlier backup of this disk in the repository", fallback=False)
    if not can_keep_checkpoint(disk):
        return full_backup(f"a {disk.format or 'non-qcow2'} image cannot keep a checkpoint")
    checkpoint = previous.source.get("checkpoint")
    if not isinstance(checkpoint, str) or not is_checkpoint(checkpoint):
        return full_backup(f"the latest snapshot {previous.snapshot} records no checkpoint")
    if previous.size != disk.size:
        return full_backup(f"the disk was resized ({previous.size} -> {disk.size} bytes)")
    image = previous.source.get("image")
    if image and image != disk.image:
        return full_backup(f"the disk is another image now ({disk.image}, was {image})")
    bitmap = disk.bitmap(checkpoint)
    if bitmap is None:
        return full_backup(
            f"checkpoint {checkpoint} is gone (removed, or QEMU stopped without storing it)"
        )
    if bitmap.inconsistent:
        return full_backup(f"checkpoint {checkpoint} is inconsistent (QEMU crashed using it)")
    if not bitmap.recording:
        return full_backup(f"checkpoint {checkpoint} stopped recording (someone disabled it)")
    if bitmap.busy:
        return full_backup(f"checkpoint {checkpoint} is in use by another operation")
    if not bitmap.persistent or bitmap.granularity != granularity:
        return full_backup(f"checkpoint {checkpoint} is not one this blockbackup made")
    return Plan(INCREMENTAL, checkpoint, previous.snapshot, None)


def stale_checkpoints(disk: Disk, keep: str | None) -> list[str]:
    """Our checkpoints on ``disk`` other than ``keep`` (the policy keeps only the newest)."""
    return [b.name for b in disk.bitmaps if is_checkpoint(b.name) and b.name != keep]
