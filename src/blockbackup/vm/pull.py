"""Read QEMU's point-in-time exports over NBD into the repository.

Each disk is the ordinary backup job of our engine, from an ``nbd`` node (the export) into a
``bb-repo-target`` node: ``sync=full`` for a full backup (holes that the export's
``base:allocation`` reports are skipped), ``sync=bitmap`` for an incremental, with a bitmap
filled from the export's ``qemu:dirty-bitmap:`` context, so only the clusters written since
the checkpoint are read and the target starts from the previous snapshot's disk index
(every snapshot's index is complete). One manifest then holds every disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blockbackup.api import BackupFailed, BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.block.graph import CloseError
from blockbackup.block.node import BlockNode
from blockbackup.nbd.client import NbdClient
from blockbackup.nbd.proto import CONTEXT_BASE_ALLOCATION
from blockbackup.repository.catalog import DiskRecord
from blockbackup.repository.drivers import RepoTargetDriver
from blockbackup.vm.checkpoints import INCREMENTAL
from blockbackup.vm.fleece import View
from blockbackup.vm.qemu import VmError

#: The dirty bitmap the incremental job copies from (in our own in-process graph).
DIRTY = "dirty"
#: NBD_STATE_DIRTY in a ``qemu:dirty-bitmap:`` context.
STATE_DIRTY = 1

#: Runs one copy job: (bb, source node, target node, label, job options).
Copier = Callable[[BlockBackup, str, str, str, dict[str, Any]], Awaitable[None]]


@dataclass
class Pulled:
    record: DiskRecord
    packs: set[str]
    dirty_bytes: int | None


async def dirty_extents(socket: str, export: str, bitmap: str, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs that ``bitmap`` marks dirty, read over NBD."""
    context = f"qemu:dirty-bitmap:{bitmap}"
    client = await NbdClient.connect(
        {"type": "unix", "path": socket}, export, contexts=(CONTEXT_BASE_ALLOCATION, context)
    )
    try:
        if client.export.context_id(context) is None:
            raise VmError(f"QEMU's export of {export} does not offer {context}")
        out: list[tuple[int, int]] = []
        offset = 0
        while offset < size:
            length = min(size - offset, 1 << 30)
            extents = await client.block_status(offset, length, context)
            if not extents:
                raise VmError(f"QEMU answered no dirty-bitmap extents at offset {offset}")
            for extent in extents:
                run = min(extent.length, size - offset)
                if extent.flags & STATE_DIRTY and run:
                    if out and out[-1][0] + out[-1][1] == offset:
                        out[-1] = (out[-1][0], out[-1][1] + run)
                    else:
                        out.append((offset, run))
                offset += run
                if offset >= size:
                    break
        return out
    finally:
        await client.close()


async def pull_disk(
    bb: BlockBackup,
    view: View,
    n: int,
    socket: str,
    repo_disk: str,
    repo: str,
    key_secret: str | None,
    copy: Copier,
    storage: dict[str, str],
) -> Pulled:
    """Back up one exported view into a target node; its flushed record (no commit)."""
    source = f"src{n}"
    target = f"tgt{n}"
    node = await bb.blockdev_add(
        {
            "driver": "nbd",
            "node-name": source,
            "server": {"type": "unix", "path": socket},
            "export": view.export_name,
            "read-only": True,
        }
    )
    if node.size != view.disk.size:
        raise VmError(
            f"{view.disk.name}: the export is {node.size} bytes, the disk {view.disk.size}"
        )
    options: dict[str, Any] = {
        "driver": "bb-repo-target",
        "node-name": target,
        "repository": repo,
        "disk": repo_disk,
        "size": node.size,
        "base": view.plan.base if view.plan.mode == INCREMENTAL else "none",
        **storage,
    }
    if key_secret is not None:
        options["key-secret"] = key_secret
    target_node = await bb.blockdev_add(options)
    driver = target_node.driver
    assert isinstance(driver, RepoTargetDriver)
    if view.plan.mode == INCREMENTAL and driver.source.get("base") != view.plan.base:
        raise VmError(f"{repo_disk}: snapshot {view.plan.base} cannot be the incremental's base")
    dirty: int | None = None
    job: dict[str, Any] = {"sync": "full"}
    if view.plan.mode == INCREMENTAL:
        runs = await dirty_extents(socket, view.export_name, view.frozen, node.size)
        bitmap = bitmaps_of(node).create(DIRTY, driver.chunk, disabled=True)
        for offset, length in runs:
            bitmap.mark_dirty(offset, length)
        dirty = sum(length for _, length in runs)
        job = {"sync": "bitmap", "bitmap": DIRTY, "bitmap_mode": "never"}
    try:
        await copy(bb, source, target, f"{view.plan.mode} {repo_disk}", job)
    except BackupFailed as exc:
        await _keep_what_was_stored(bb, target_node)
        raise VmError(f"{repo_disk}: backup failed: {exc}") from None
    result = driver.result
    if result is None:
        raise VmError(f"{repo_disk}: the backup finished without flushing its target")
    return Pulled(result.record, set(result.packs), dirty)


async def _keep_what_was_stored(bb: BlockBackup, target: BlockNode) -> None:
    """After a failed job: flush the target once, so the chunks it stored are reused by the
    next run, then close it without another try (the job's error is what the user reads)."""
    try:
        await target.flush()
    except OSError:
        pass
    with contextlib.suppress(CloseError, OSError):
        await bb.graph.drop(target)


@dataclass
class Result:
    snapshot: str
    pulled: list[Pulled]
    stored_chunks: int
    stored_bytes: int
    reused_chunks: int


async def pull_all(
    views: list[View],
    socket: str,
    repo_disks: list[str],
    repo: str,
    secret_object: dict[str, Any] | None,
    copy: Copier,
    sources: list[dict[str, Any]],
    tags: dict[str, str],
    release: Callable[[View], Awaitable[object]] | None = None,
    storage: dict[str, str] | None = None,
) -> Result:
    """Every view into the repository, then one manifest for them all (``sources``: what
    each disk's record says about where it came from, the new checkpoint among it;
    ``release``: called with each view once its disk is read and flushed)."""
    async with BlockBackup() as bb:
        key = None
        if secret_object is not None:
            bb.object_add(secret_object)
            key = str(secret_object["id"])
        pulled = []
        for n, (view, name) in enumerate(zip(views, repo_disks, strict=True)):
            pulled.append(
                await pull_disk(bb, view, n, socket, name, repo, key, copy, storage or {})
            )
            if release is not None:
                await bb.graph.drop(bb.graph.get(f"src{n}"))  # our NBD client first
                await release(view)
        drivers = [bb.graph.get(f"tgt{n}").driver for n in range(len(views))]
        targets = [d for d in drivers if isinstance(d, RepoTargetDriver)]
        records = []
        packs: set[str] = set()
        for item, source in zip(pulled, sources, strict=True):
            item.record.source.update(source)
            records.append(item.record)
            packs |= item.packs
        manifest = await asyncio.to_thread(targets[0].commit, records, tags, packs)
        return Result(
            snapshot=manifest.id,
            pulled=pulled,
            stored_chunks=sum(t.counts.stored_blobs for t in targets),
            stored_bytes=sum(t.counts.stored_bytes for t in targets),
            reused_chunks=sum(t.counts.reused_blobs for t in targets),
        )
