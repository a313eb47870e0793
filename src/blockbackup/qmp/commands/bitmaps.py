"""The ``block-dirty-bitmap-*`` commands, each as a transaction action.

Why every command is written as prepare / commit / abort: the same seven operations are
``transaction`` actions, where a later action's failure must undo the earlier ones. A
plain command is just prepare then commit. Texts and check order are qemu-storage-daemon
7.2's. A commit touching a persistent bitmap returns once its storage is durable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockbackup.block.bitmap import Bitmap
from blockbackup.block.bitmap_store import store_of
from blockbackup.block.dirty_bitmap import DirtyBitmap, bitmaps_of
from blockbackup.block.node import BlockNode
from blockbackup.errors import BlockBackupError
from blockbackup.qmp.context import Context, Services
from blockbackup.qmp.registry import Args, command
from blockbackup.qmp.schema import BOOL, STR, Alternate, Array, Builtin, Member, Struct

__all__ = [
    "BITMAP_ACTIONS",
    "BLOCK_DIRTY_BITMAP",
    "BLOCK_DIRTY_BITMAP_ADD",
    "BLOCK_DIRTY_BITMAP_MERGE",
    "Action",
]


class _Uint32(Builtin):
    """QAPI ``uint32`` with QEMU's texts for non-integers and out-of-range values."""

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        if keyval and isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise BlockBackupError(f"Parameter '{path}' expects uint64") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise BlockBackupError(f"Parameter '{path}' expects uint64")
        if not 0 <= value <= 0xFFFFFFFF:
            raise BlockBackupError(f"Parameter '{path}' expects uint32_t")
        return value


UINT32 = _Uint32("uint32", "int", "integer")

BLOCK_DIRTY_BITMAP = Struct("BlockDirtyBitmap", [Member("node", STR), Member("name", STR)])
BLOCK_DIRTY_BITMAP_ADD = Struct(
    "BlockDirtyBitmapAdd",
    [
        Member("node", STR),
        Member("name", STR),
        Member("granularity", UINT32, optional=True),
        Member("persistent", BOOL, optional=True),
        Member("disabled", BOOL, optional=True),
    ],
)
_BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", (STR, BLOCK_DIRTY_BITMAP))
BLOCK_DIRTY_BITMAP_MERGE = Struct(
    "BlockDirtyBitmapMerge",
    [
        Member("node", STR),
        Member("target", STR),
        Member("bitmaps", Array(_BITMAP_OR_STR)),
    ],
)


@dataclass(eq=False)
class Action:
    """A prepared action: ``commit`` makes it final, ``abort`` undoes it (neither fails)."""

    on_commit: Callable[[], None] = lambda: None
    on_abort: Callable[[], None] = lambda: None

    #: Persistent bitmaps whose storage the commit waits for (clear, merge, remove).
    settle: tuple[BlockNode, ...] = ()

    async def commit(self) -> None:
        self.on_commit()
        await _settle(self.settle)

    async def abort(self) -> None:
        self.on_abort()


async def _settle(nodes: tuple[BlockNode, ...]) -> None:
    """Wait until the persistent bitmaps of ``nodes`` are durable (log and image)."""
    for node in nodes:
        store = store_of(node)
        if store is not None:
            await store.settle()


def _persistent(bitmap: DirtyBitmap) -> tuple[BlockNode, ...]:
    return (bitmap.node,) if bitmap.persistent else ()


def _node(services: Services, name: str) -> BlockNode:
    node = services.graph.find(name)
    if node is None:
        raise BlockBackupError(f"Node '{name}' not found")
    return node


def lookup(services: Services, node_name: str, name: str) -> DirtyBitmap:
    """QEMU's ``block_dirty_bitmap_lookup``: the node, then the bitmap."""
    bitmap = bitmaps_of(_node(services, node_name)).get(name)
    if bitmap is None:
        raise BlockBackupError(f"Dirty bitmap '{name}' not found")
    return bitmap


def _restore(bitmap: DirtyBitmap, saved: Bitmap) -> Callable[[], None]:
    def undo() -> None:
        bitmap.bitmap = saved
        bitmap._persist()  # bits came back: the durable copy must hold them again

    return undo


# -- the actions --------------------------------------------------------------------------------


def prepare_add(services: Services, args: Args) -> Action:
    name: str = args["name"]
    if not name:
        raise BlockBackupError("Bitmap name cannot be empty")
    node = services.graph.get(args["node"])
    registry = bitmaps_of(node)
    bitmap = registry.create(
        name,
        args.get("granularity"),
        persistent=bool(args.get("persistent", False)),
        disabled=bool(args.get("disabled", False)),
    )
    return Action(on_abort=lambda: registry.release(bitmap), settle=_persistent(bitmap))


def prepare_remove(services: Services, args: Args) -> Action:
    bitmap = lookup(services, args["node"], args["name"])
    if bitmap.busy:  # QEMU checks only "busy" here: an inconsistent bitmap can go
        bitmap.check_usable()
    # Held busy until the end of the transaction; released at commit (QEMU's order).
    bitmap.busy_flag = True

    def commit() -> None:
        bitmap.busy_flag = False
        bitmaps_of(bitmap.node).release(bitmap)

    def abort() -> None:
        bitmap.busy_flag = False

    return Action(on_commit=commit, on_abort=abort, settle=_persistent(bitmap))


def prepare_clear(services: Services, args: Args) -> Action:
    bitmap = lookup(services, args["node"], args["name"])
    bitmap.check_usable()
    saved = bitmap.bitmap.copy()
    bitmap.clear()
    return Action(on_abort=_restore(bitmap, saved), settle=_persistent(bitmap))


def _prepare_toggle(services: Services, args: Args, enable: bool) -> Action:
    bitmap = lookup(services, args["node"], args["name"])
    bitmap.check_usable()
    was_enabled = bitmap.enabled
    if enable:
        bitmap.enable()
    else:
        bitmap.disable()

    def abort() -> None:
        if was_enabled:
            bitmap.enable()
        else:
            bitmap.disable()

    return Action(on_abort=abort, settle=_persistent(bitmap))


def prepare_enable(services: Services, args: Args) -> Action:
    return _prepare_toggle(services, args, True)


def prepare_disable(services: Services, args: Args) -> Action:
    return _prepare_toggle(services, args, False)


def prepare_merge(services: Services, args: Args) -> Action:
    target = lookup(services, args["node"], args["target"])
    target.check_usable()
    sources: list[DirtyBitmap] = []
    for ref in args["bitmaps"]:
        if isinstance(ref, str):
            source = lookup(services, args["node"], ref)
        else:
            source = lookup(services, ref["node"], ref["name"])
        source.check_usable()
        if source.bitmap.size != target.bitmap.size:
            raise BlockBackupError("Bitmaps are incompatible and can't be merged")
        sources.append(source)
    saved = target.bitmap.copy()
    for source in sources:
        target.merge_from(source)
    return Action(on_abort=_restore(target, saved), settle=_persistent(target))


#: ``transaction`` action type -> (argument struct, prepare).
BITMAP_ACTIONS: dict[str, tuple[Struct, Callable[[Services, Args], Action]]] = {
    "block-dirty-bitmap-add": (BLOCK_DIRTY_BITMAP_ADD, prepare_add),
    "block-dirty-bitmap-remove": (BLOCK_DIRTY_BITMAP, prepare_remove),
    "block-dirty-bitmap-clear": (BLOCK_DIRTY_BITMAP, prepare_clear),
    "block-dirty-bitmap-enable": (BLOCK_DIRTY_BITMAP, prepare_enable),
    "block-dirty-bitmap-disable": (BLOCK_DIRTY_BITMAP, prepare_disable),
    "block-dirty-bitmap-merge": (BLOCK_DIRTY_BITMAP_MERGE, prepare_merge),
}


def _declare(name: str, args: Struct, prepare: Callable[[Services, Args], Action]) -> None:
    async def handler(ctx: Context, checked: Args) -> None:
        await prepare(ctx.services, checked).commit()

    handler.__name__ = name.replace("-", "_")
    command(name, args=args)(handler)


for _name, (_args, _prepare) in BITMAP_ACTIONS.items():
    _declare(_name, _args, _prepare)


@command(
    "x-debug-block-dirty-bitmap-sha256",
    args=BLOCK_DIRTY_BITMAP,
    returns=Struct("BlockDirtyBitmapSha256", [Member("sha256", STR)]),
    features=("unstable",),
)
async def x_debug_block_dirty_bitmap_sha256(ctx: Context, args: Args) -> dict[str, str]:
    bitmap = lookup(ctx.services, args["node"], args["name"])
    return {"sha256": bitmap.sha256()}
