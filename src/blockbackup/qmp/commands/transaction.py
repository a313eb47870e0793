"""``transaction``: several actions at one point in time, all or nothing.

Why the order of the steps: every node an action touches (a backup's source, a bitmap's
node) is quiesced first, all together, so no write lands between two actions and several
backups share one T0. Then every action is prepared in order (a backup validates, inserts
its filter and creates its job; a bitmap action applies itself, keeping what it needs to
undo); if one fails, the prepared ones are undone in reverse order and the failure is the
reply. Otherwise each is committed (backup jobs start) and the nodes are released.
"""

from __future__ import annotations

import contextlib

from blockbackup.block.node import BlockNode
from blockbackup.errors import BlockBackupError
from blockbackup.jobs.backup import BackupJob, insert_backup, plan_backup
from blockbackup.jobs.job import JobTxn
from blockbackup.jobs.status import JobStatus
from blockbackup.qmp.commands.backup import BLOCKDEV_BACKUP, LeafEnum, backup_options
from blockbackup.qmp.commands.bitmaps import BITMAP_ACTIONS, Action
from blockbackup.qmp.context import Context, Services
from blockbackup.qmp.registry import Args, command
from blockbackup.qmp.schema import Array, Member, Struct

__all__ = ["TRANSACTION", "run_transaction"]


_ACTION_ARGS: dict[str, Struct] = {
    "abort": Struct("Abort"),
    **{name: args for name, (args, _) in BITMAP_ACTIONS.items()},
    "blockdev-backup": BLOCKDEV_BACKUP,
}
TRANSACTION_ACTION = Struct(
    "TransactionAction",
    [Member("type", LeafEnum("TransactionActionKind", tuple(_ACTION_ARGS)))],
    tag="type",
    variants={
        name: Struct(f"q_obj_{name}-wrapper", [Member("data", args)])
        for name, args in _ACTION_ARGS.items()
    },
)
TRANSACTION_PROPERTIES = Struct(
    "TransactionProperties",
    [
        Member(
            "completion-mode",
            LeafEnum("ActionCompletionMode", ("individual", "grouped")),
            optional=True,
        )
    ],
)
TRANSACTION = Struct(
    "q_obj_transaction-arg",
    [
        Member("actions", Array(TRANSACTION_ACTION)),
        Member("properties", TRANSACTION_PROPERTIES, optional=True),
    ],
)


class _BackupAction(Action):
    """A backup inserted at T0: started at commit, cancelled (undone) at abort."""

    def __init__(self, job: BackupJob) -> None:
        super().__init__()
        self.job = job

    async def commit(self) -> None:
        self.job.manager.start(self.job)

    async def abort(self) -> None:
        job = self.job
        if job.status is JobStatus.CREATED and not job.cancelled:
            await job.cancel()
        await job.manager.wait_concluded(job)


def _touched_nodes(services: Services, actions: list[Args]) -> list[BlockNode]:
    """Nodes to hold quiesced: backup sources and bitmap nodes (unknown names skipped)."""
    nodes: list[BlockNode] = []
    for action in actions:
        data = action["data"]
        if action["type"] == "blockdev-backup":
            name = data.get("device")
        elif action["type"].startswith("block-dirty-bitmap-"):
            name = data.get("node")
        else:
            continue
        node = services.graph.find(name) if isinstance(name, str) else None
        if node is not None and node not in nodes:
            nodes.append(node)
    return nodes


async def _prepare(services: Services, action: Args, txn: JobTxn | None) -> Action:
    kind, data = action["type"], action["data"]
    if kind == "abort":
        raise BlockBackupError("Transaction aborted using Abort action")
    if kind == "blockdev-backup":
        plan = plan_backup(services.graph, services.jobs, backup_options(data))
        return _BackupAction(await insert_backup(services.graph, services.jobs, plan, txn))
    if txn is not None:  # only backups take part in grouped completion
        raise BlockBackupError(
            f"Action '{kind}' does not support Transaction property completion-mode = grouped"
        )
    _, prepare = BITMAP_ACTIONS[kind]
    return prepare(services, data)


async def run_transaction(
    services: Services, actions: list[Args], completion_mode: str = "individual"
) -> None:
    """Prepare every action at one point in time; commit all, or undo all and raise."""
    txn = JobTxn("grouped") if completion_mode == "grouped" else None
    async with contextlib.AsyncExitStack() as quiesced:
        for node in _touched_nodes(services, actions):
            await quiesced.enter_async_context(node.quiesced())
        prepared: list[Action] = []
        try:
            for action in actions:
                # One by one: what was prepared before a failure must be undone.
                prepared.append(await _prepare(services, action, txn))  # noqa: PERF401
        except BaseException:
            for done in reversed(prepared):
                await done.abort()
            raise
        for done in prepared:
            await done.commit()


@command("transaction", args=TRANSACTION)
async def transaction(ctx: Context, args: Args) -> None:
    properties = args.get("properties") or {}
    mode = properties.get("completion-mode") or "individual"
    await run_transaction(ctx.services, args["actions"], mode)
