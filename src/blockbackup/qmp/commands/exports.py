"""NBD server and block export commands, mapped onto NbdServer and ExportManager.

Why the socket address types are declared twice: QMP's ``nbd-server-start`` takes the
legacy ``{type, data: {...}}`` form while the command line's ``--nbd-server`` takes the
flat one; both reach the same handler.
"""

from __future__ import annotations

from typing import Any

from blockbackup.errors import BlockBackupError
from blockbackup.qmp.context import Context
from blockbackup.qmp.registry import Args, command, event
from blockbackup.qmp.schema import BOOL, INT, STR, Alternate, Array, Enum, Member, Struct

_UNIX = [
    Member("path", STR),
    Member("abstract", BOOL, optional=True),
    Member("tight", BOOL, optional=True),
]
_INET = [
    Member("host", STR),
    Member("port", STR),
    Member("numeric", BOOL, optional=True),
    Member("to", INT, optional=True),
    Member("ipv4", BOOL, optional=True),
    Member("ipv6", BOOL, optional=True),
    Member("keep-alive", BOOL, optional=True),
]
UNIX_ADDRESS = Struct("UnixSocketAddress", _UNIX)
INET_ADDRESS = Struct("InetSocketAddress", _INET)
_SOCKET_TYPE = Enum("SocketAddressType", ("inet", "unix"))
SOCKET_ADDRESS_LEGACY = Struct(
    "SocketAddressLegacy",
    [Member("type", _SOCKET_TYPE)],
    tag="type",
    variants={
        "unix": Struct("q_obj_UnixSocketAddressWrapper", [Member("data", UNIX_ADDRESS)]),
        "inet": Struct("q_obj_InetSocketAddressWrapper", [Member("data", INET_ADDRESS)]),
    },
)
SOCKET_ADDRESS = Struct(
    "SocketAddress",
    [Member("type", _SOCKET_TYPE)],
    tag="type",
    variants={"unix": UNIX_ADDRESS, "inet": INET_ADDRESS},
)
_SERVER_COMMON = [
    Member("tls-creds", STR, optional=True),
    Member("tls-authz", STR, optional=True),
    Member("max-connections", INT, default=0),
]
NBD_SERVER_START = Struct(
    "q_obj_nbd-server-start-arg", [Member("addr", SOCKET_ADDRESS_LEGACY), *_SERVER_COMMON]
)
#: ``--nbd-server`` (``NbdServerOptions``).
NBD_SERVER_OPTIONS = Struct("NbdServerOptions", [Member("addr", SOCKET_ADDRESS), *_SERVER_COMMON])
_BITMAP_REF = Alternate(
    "BlockDirtyBitmapOrStr",
    (STR, Struct("BlockDirtyBitmap", [Member("node", STR), Member("name", STR)])),
)
BLOCK_EXPORT_OPTIONS = Struct(
    "BlockExportOptions",
    [
        Member("type", Enum("BlockExportType", ("nbd",))),
        Member("id", STR),
        Member("fixed-iothread", BOOL, optional=True),
        Member("iothread", STR, optional=True),
        Member("node-name", STR),
        Member("writable", BOOL, default=False),
        Member("writethrough", BOOL, default=False),
    ],
    tag="type",
    variants={
        "nbd": Struct(
            "BlockExportOptionsNbd",
            [
                Member("name", STR, optional=True),
                Member("description", STR, optional=True),
                Member("bitmaps", Array(_BITMAP_REF), optional=True),
                Member("allocation-depth", BOOL, default=False),
            ],
        )
    },
)


async def nbd_server_start(ctx: Context, args: Args) -> None:
    """The one handler behind ``nbd-server-start`` and ``--nbd-server``."""
    await ctx.services.nbd.start(
        args["addr"],
        tls_creds=args.get("tls-creds"),
        tls_authz=args.get("tls-authz"),
        max_connections=args["max-connections"],
    )


command("nbd-server-start", args=NBD_SERVER_START)(nbd_server_start)


@command("nbd-server-stop")
async def nbd_server_stop(ctx: Context, args: Args) -> None:
    await ctx.services.nbd.stop()


@command("block-export-add", args=BLOCK_EXPORT_OPTIONS)
async def block_export_add(ctx: Context, args: Args) -> None:
    if "iothread" in args:
        raise BlockBackupError("iothreads are not supported")
    graph = ctx.services.graph
    node_name = args["node-name"]
    try:
        ctx.services.exports.add(
            args["id"],
            node_name,
            type=args["type"],
            writable=args["writable"],
            writethrough=args["writethrough"],
            name=args.get("name"),
            description=args.get("description"),
            bitmaps=args.get("bitmaps"),
            allocation_depth=args["allocation-depth"],
        )
    except BlockBackupError as exc:
        if graph.find(node_name) is None and str(exc).startswith("Cannot find device="):
            # QEMU looks the export's node up by node name only.
            raise BlockBackupError(f"Cannot find device='' nor node-name='{node_name}'") from exc
        raise


@command(
    "block-export-del",
    args=Struct(
        "q_obj_block-export-del-arg",
        [
            Member("id", STR),
            Member("mode", Enum("BlockExportRemoveMode", ("safe", "hard")), default="safe"),
        ],
    ),
)
async def block_export_del(ctx: Context, args: Args) -> None:
    ctx.services.exports.delete(args["id"], args["mode"])


@command("query-block-exports", returns=Array(Struct("BlockExportInfo", open=True)))
async def query_block_exports(ctx: Context, args: Args) -> list[dict[str, Any]]:
    return ctx.services.exports.query()[::-1]  # newest first, as QEMU lists them


event("BLOCK_EXPORT_DELETED", Struct("q_BLOCK_EXPORT_DELETED", [Member("id", STR)]))
