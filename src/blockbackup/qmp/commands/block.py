"""Block graph commands: ``blockdev-add``/``-del`` and graph introspection.

Why thin: the graph validates node options itself (with QEMU's texts), so ``blockdev-add``
hands the whole options dict to :meth:`Graph.add`; this module only renders QEMU's
introspection shapes.
"""

from __future__ import annotations

from typing import Any

from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.block.driver import DRIVERS
from blockbackup.block.node import BlockNode
from blockbackup.block.permissions import link_use, qapi_names, user_use
from blockbackup.jobs.job import Job
from blockbackup.qmp.context import Context
from blockbackup.qmp.registry import Args, command
from blockbackup.qmp.schema import BOOL, STR, Enum, Member, Struct

#: The base members of ``BlockdevOptions``; driver options are checked by the graph.
BLOCKDEV_OPTIONS = Struct(
    "BlockdevOptions",
    [
        Member("driver", Enum("BlockdevDriver", tuple(sorted(DRIVERS)))),
        Member("node-name", STR, optional=True),
        Member("discard", Enum("BlockdevDiscardOptions", ("ignore", "unmap")), optional=True),
        Member(
            "cache",
            Struct(
                "BlockdevCacheOptions",
                [Member("direct", BOOL, optional=True), Member("no-flush", BOOL, optional=True)],
            ),
            optional=True,
        ),
        Member("read-only", BOOL, optional=True),
        Member("auto-read-only", BOOL, optional=True),
        Member("force-share", BOOL, optional=True),
        Member(
            "detect-zeroes",
            Enum("BlockdevDetectZeroesOptions", ("off", "on", "unmap")),
            optional=True,
        ),
    ],
    open=True,
)


@command("blockdev-add", args=BLOCKDEV_OPTIONS)
async def blockdev_add(ctx: Context, args: Args) -> None:
    await ctx.services.graph.add(args)


@command("blockdev-del", args=Struct("q_obj_blockdev-del-arg", [Member("node-name", STR)]))
async def blockdev_del(ctx: Context, args: Args) -> None:
    await ctx.services.graph.delete(args["node-name"])


def _filename(node: BlockNode) -> str:
    """QEMU's ``bs->filename``: a protocol node's file, inherited by the layers above."""
    seen: BlockNode | None = node
    while seen is not None:
        filename = seen.config.options.get("filename")
        if isinstance(filename, str):
            return filename
        if seen.driver.driver_name == "null-co":
            return "null-co://"
        seen = seen.children.get("file")
    return ""


def node_info(node: BlockNode) -> dict[str, Any]:
    """One ``BlockDeviceInfo`` of ``query-named-block-nodes``."""
    filename = _filename(node)
    config = node.config
    info: dict[str, Any] = {
        "node-name": node.name,
        "drv": node.driver.driver_name,
        "ro": node.read_only,
        "file": filename,
        "encrypted": False,
        "backing_file_depth": 0,
        "detect_zeroes": config.detect_zeroes,
        "image": {
            "filename": filename,
            "format": node.driver.driver_name,
            "virtual-size": node.size,
            "dirty-flag": False,
        },
        "cache": {
            "writeback": True,
            "direct": config.cache_direct,
            "no-flush": config.no_flush,
        },
        "write_threshold": 0,
    }
    bitmaps = list(bitmaps_of(node))
    if bitmaps:  # QEMU omits the member when the node has none
        info["dirty-bitmaps"] = [bm.info() for bm in reversed(bitmaps)]
    for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
        info[key] = 0
    backing = node.backing()
    if backing is not None:
        info["backing_file"] = _filename(backing)
        depth = 0
        while backing is not None:
            depth += 1
            backing = backing.backing()
        info["backing_file_depth"] = depth
    return info


@command(
    "query-named-block-nodes",
    args=Struct("q_obj_query-named-block-nodes-arg", [Member("flat", BOOL, optional=True)]),
    returns=Struct("BlockDeviceInfo", open=True),
)
async def query_named_block_nodes(ctx: Context, args: Args) -> list[dict[str, Any]]:
    return [node_info(n) for n in reversed(list(ctx.services.graph.nodes.values()))]


@command(
    "x-debug-query-block-graph",
    returns=Struct("XDbgBlockGraph", open=True),
    features=("unstable",),
)
async def x_debug_query_block_graph(ctx: Context, args: Args) -> dict[str, Any]:
    """Nodes (drivers, plus the jobs and exports using them) and their edges."""
    ids: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []

    def ident(obj: object, kind: str, name: str) -> int:
        key = id(obj)
        if key not in ids:
            ids[key] = len(ids) + 1
            nodes.append({"id": ids[key], "type": kind, "name": name})
        return ids[key]

    graph_nodes = list(ctx.services.graph.nodes.values())
    for node in reversed(graph_nodes):
        ident(node, "block-driver", node.name)
    for node in reversed(graph_nodes):
        for role, child in node.children.items():
            use = link_use(node, role)
            edges.append(
                {
                    "parent": ids[id(node)],
                    "child": ident(child, "block-driver", child.name),
                    "name": role,
                    "perm": qapi_names(use.perm),
                    "shared-perm": qapi_names(use.shared),
                }
            )
        for user in node.users:
            if isinstance(user, Job):
                parent = ident(user, "block-job", user.id)
                role = "target" if getattr(user, "target", None) is node else "main node"
            else:
                parent = ident(user, "block-backend", "")
                role = "root"
            use = user_use(user)
            edges.append(
                {
                    "parent": parent,
                    "child": ids[id(node)],
                    "name": role,
                    "perm": qapi_names(use.perm),
                    "shared-perm": qapi_names(use.shared),
                }
            )
    return {"nodes": nodes, "edges": edges}
