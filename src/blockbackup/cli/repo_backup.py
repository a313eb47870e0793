"""``blockbackup backup IMAGE --repo R [--name N]``: an image at rest into the repository.

The image (raw or qcow2) is read whole by the backup job into a ``bb-repo-target`` node that
starts from the disk's latest snapshot, so unchanged chunks are recognised, not stored again;
the snapshot is committed after the job (and so the target's flush) succeeded.

The ``backup`` subcommand's parser (:mod:`.backup`) declares the options and calls :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import stat
from typing import Any

from blockbackup.cli.heap import keep_freed_memory
from blockbackup.cli.imageformat import probe, read_header
from blockbackup.cli.repo_common import (
    copy_with_progress,
    emit,
    guarded,
    open_secret,
    requests_of,
    run_stoppable,
    secret_object,
    stop_signals,
    storage_options,
)
from blockbackup.errors import BlockBackupError


def image_format(path: str) -> str:
    """raw or qcow2, probed as ``serve`` probes; another image format is refused rather
    than backed up as the bytes of its container."""
    try:
        fmt = probe(read_header(path, writable=False)) or "raw"
    except OSError as exc:
        raise BlockBackupError(f"{path}: {exc.strerror}") from exc
    if fmt not in ("raw", "qcow2"):
        raise BlockBackupError(f"{path} is a {fmt} image: convert it to raw or qcow2 first")
    return fmt


def _check_image_path(path: str) -> None:
    """An image at rest is a file or a block device (an LVM volume, a disk); say which
    mistake it is before anything opens the repository."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BlockBackupError(f"{path}: no such image file") from None
    except OSError as exc:
        raise BlockBackupError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise BlockBackupError(f"{path} is a directory: give an image file or a block device")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise BlockBackupError(f"{path} is not an image file or a block device")


@guarded
def run(args: argparse.Namespace) -> int:
    keep_freed_memory()
    _check_image_path(args.image)
    secret = open_secret(args)
    name = args.name or os.path.basename(args.image)
    with stop_signals() as stops:
        result = run_stoppable(_backup(args, secret, name), stops)
    text = (
        f"snapshot {result['snapshot']}: disk {name}, {result['size']} bytes, "
        f"{result['stored_bytes']} bytes stored in {result['stored_chunks']} new chunks "
        f"and {result['stored_index_blobs']} disk index blobs, "
        f"{result['reused_chunks']} chunks already in the repository"
    )
    emit(args, result, text)
    return 0


async def _backup(args: argparse.Namespace, secret: bytes | None, name: str) -> dict[str, Any]:
    from blockbackup.api import BackupFailed, BlockBackup  # lazy: start-up cost
    from blockbackup.repository.drivers import RepoTargetDriver  # lazy: start-up cost

    key = secret_object(secret)
    async with BlockBackup() as bb:
        if key is not None:
            bb.object_add(key)
        source = await bb.blockdev_add(
            {
                "driver": image_format(args.image),
                "node-name": "source",
                "read-only": True,
                "file": {"driver": "file", "filename": args.image},
            }
        )
        target_options: dict[str, Any] = {
            "driver": "bb-repo-target",
            "node-name": "target",
            "repository": args.repo,
            "disk": name,
            "size": source.size,
            "base": args.base,
            **storage_options(args),
        }
        if key is not None:
            target_options["key-secret"] = key["id"]
        target = await bb.blockdev_add(target_options)
        try:
            await copy_with_progress(bb, "source", "target", f"backup {name}", args.json)
        except BackupFailed as exc:
            error = getattr(target.driver, "storage_error", None)
            await _keep_what_was_stored(bb, target)
            if error:
                raise BlockBackupError(f"{error} (no snapshot was committed)") from exc
            if str(exc) == os.strerror(errno.ENOSPC):
                # what this run stored is kept for the next run to reuse: on a full disk
                # that is the space the user needs back, so say how to get it
                raise BlockBackupError(
                    f"{exc}: no snapshot was committed; what this run stored stays for the "
                    f"next run to reuse (`blockbackup gc --repo {args.repo}` frees it)"
                ) from exc
            raise
        driver = target.driver
        assert isinstance(driver, RepoTargetDriver)
        result = driver.result
        if result is None:
            raise BlockBackupError("the backup finished without flushing its target")
        result.record.source["image"] = os.path.abspath(args.image)
        manifest = await asyncio.to_thread(driver.commit, [result.record], None, result.packs)
        counts = driver.counts
        return {
            "snapshot": manifest.id,
            "disk": name,
            "size": source.size,
            # data chunks and the disk index's segment blobs, counted apart
            "stored_chunks": counts.stored_blobs - counts.stored_index_blobs,
            "stored_index_blobs": counts.stored_index_blobs,
            "stored_bytes": counts.stored_bytes,
            "stored_index_bytes": counts.stored_index_bytes,
            "reused_chunks": counts.reused_blobs,
            "base": result.record.source.get("base"),
            "requests": requests_of(driver.repo),
        }


async def _keep_what_was_stored(bb: Any, target: Any) -> None:
    """After a failed job: flush the target once, so the chunks it stored are reused by the
    next run, then close it without another flush. The job's error is what the user sees;
    if this flush fails too (a full disk), its data is simply not kept."""
    try:
        await target.flush()
    except OSError:
        pass
    await bb.graph.drop(target)
