"""``x-bb-repo-commit``: one snapshot manifest for the ``bb-repo-target`` nodes of a backup.

Why a command: a live backup of several disks is one ``transaction`` of backup jobs into
repository target nodes; each target's ``flush`` (the job's last step) makes its chunks and
disk index durable but commits nothing, so that the disks of one point in time become one
snapshot, or none. The client runs this command once every job concluded successfully:
the daemon holds the flushed records, and the client never needs the repository's key.

It refuses, changing nothing, a node that is not a repository target, one whose backup job
is still running, failed or was cancelled, and one that nothing has flushed. The manifest's
disk ``source`` gets what the client adds per node (``sources``: the checkpoint bitmap an
incremental read from, or started), next to the base snapshot the target started from
(which the client cannot change); a node said to be incremental (``read-from``) that
started from no snapshot is refused: its unchanged clusters would read as zeroes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from blockbackup.block.node import BlockNode
from blockbackup.errors import BlockBackupError
from blockbackup.jobs.backup import BackupJob
from blockbackup.jobs.status import JobStatus
from blockbackup.qmp.context import Context, Services
from blockbackup.qmp.registry import Args, command
from blockbackup.qmp.schema import ANY, STR, Array, Member, Struct
from blockbackup.repository.drivers import RepoTargetDriver
from blockbackup.repository.errors import RepositoryError

__all__ = ["REPO_COMMIT"]

REPO_COMMIT = Struct(
    "q_obj_x-bb-repo-commit-arg",
    [
        Member("nodes", Array(STR)),
        Member("tags", ANY, optional=True),
        Member("sources", ANY, optional=True),
    ],
)


def _str_map(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise BlockBackupError(f"Parameter '{what}' expects an object")
    return dict(value)


def _target(services: Services, name: str) -> tuple[BlockNode, RepoTargetDriver]:
    node = services.graph.find(name)
    if node is None:
        raise BlockBackupError(f"Cannot find device='{name}' nor node-name='{name}'")
    driver = node.driver
    if not isinstance(driver, RepoTargetDriver):
        raise BlockBackupError(f"Node '{name}' is not a bb-repo-target node")
    return node, driver


def _check_flushed(
    services: Services, name: str, node: BlockNode, driver: RepoTargetDriver
) -> None:
    """The backup jobs that wrote ``node`` all concluded successfully, and it was flushed."""
    for job in services.jobs.jobs:
        if not isinstance(job, BackupJob) or job.target is not node:
            continue
        if job.status not in (JobStatus.PENDING, JobStatus.CONCLUDED):
            raise BlockBackupError(
                f"Node '{name}' is still written by job '{job.id}' ({job.status.value}): "
                "commit after it concluded"
            )
        if job.error is not None or job.cancelled:
            raise BlockBackupError(
                f"Node '{name}' was written by job '{job.id}', which did not succeed: "
                "nothing to commit"
            )
    if driver.result is None:
        raise BlockBackupError(f"Node '{name}' has not been flushed by a concluded backup job")


@command(
    "x-bb-repo-commit",
    args=REPO_COMMIT,
    returns=Struct("XBbRepoCommitResult", open=True),
    features=("unstable",),
)
async def repo_commit(ctx: Context, args: Args) -> dict[str, Any]:
    names: list[str] = args["nodes"]
    if not names:
        raise BlockBackupError("Parameter 'nodes' must name at least one bb-repo-target node")
    if len(set(names)) != len(names):
        raise BlockBackupError("Parameter 'nodes' names a node twice")
    tags = {str(k): str(v) for k, v in _str_map(args.get("tags"), "tags").items()}
    sources = _str_map(args.get("sources"), "sources")
    unknown = sorted(set(sources) - set(names))
    if unknown:
        raise BlockBackupError(f"Parameter 'sources' names a node not in 'nodes': {unknown[0]}")
    services = ctx.services
    targets = [_target(services, name) for name in names]
    for name, (node, driver) in zip(names, targets, strict=True):
        _check_flushed(services, name, node, driver)
    first = targets[0][1].repo
    for name, (_, driver) in zip(names, targets, strict=True):
        if driver.repo.id != first.id:
            raise BlockBackupError(f"Node '{name}' writes to another repository than '{names[0]}'")
    records, packs = [], set()
    for name, (_, driver) in zip(names, targets, strict=True):
        result = driver.result
        assert result is not None  # checked above
        record = result.record
        extra = _str_map(sources.get(name), f"sources.{name}")
        if "read-from" in extra and record.source.get("base", "none") == "none":
            # only the changed clusters were written: without its base it is not the disk
            raise BlockBackupError(
                f"Node '{name}' was written incrementally but started from no snapshot"
            )
        record.source = {**extra, **record.source}  # the node's own base is the truth
        records.append(record)
        packs |= result.packs
    try:
        manifest = await asyncio.to_thread(targets[0][1].commit, records, tags, packs)
    except RepositoryError as exc:
        raise BlockBackupError(str(exc)) from None
    disks = []
    for name, (_, driver) in zip(names, targets, strict=True):
        counts = driver.counts  # the node's own: the store may be shared
        disks.append(
            {
                "node": name,
                "disk": driver.disk,
                "size": driver.size,
                "base": driver.source.get("base", "none"),
                "stored-chunks": counts.stored_blobs,
                "stored-bytes": counts.stored_bytes,
                "reused-chunks": counts.reused_blobs,
            }
        )
    return {"snapshot": manifest.id, "time": manifest.time, "disks": disks}
