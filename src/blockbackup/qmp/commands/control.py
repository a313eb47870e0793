"""Session and daemon control: capabilities, introspection, version, quit.

Why here: these commands act on the monitor and the daemon as a whole, not on the graph.
"""

from __future__ import annotations

from typing import Any

from blockbackup import __version__
from blockbackup.qmp.context import Context
from blockbackup.qmp.registry import Args, CommandNotFoundError, command
from blockbackup.qmp.schema import INT, STR, Array, Enum, Member, Struct

#: The QEMU version blockbackup speaks for (qemu-storage-daemon 7.2.22's QMP surface).
QEMU_VERSION = {"micro": 22, "minor": 2, "major": 7}
PACKAGE = f"blockbackup {__version__}"

QMP_CAPABILITY = Enum("QMPCapability", ("oob",))
QMP_CAPABILITIES_ARGS = Struct(
    "q_obj_qmp_capabilities-arg", [Member("enable", Array(QMP_CAPABILITY), optional=True)]
)
VERSION_TRIPLE = Struct(
    "VersionTriple", [Member("major", INT), Member("minor", INT), Member("micro", INT)]
)
VERSION_INFO = Struct("VersionInfo", [Member("qemu", VERSION_TRIPLE), Member("package", STR)])
COMMAND_INFO = Struct("CommandInfo", [Member("name", STR)])


def greeting() -> dict[str, Any]:
    """The QMP greeting every session starts with."""
    return {"QMP": {"version": version_info(), "capabilities": ["oob"]}}


def version_info() -> dict[str, Any]:
    return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}


@command("qmp_capabilities", args=QMP_CAPABILITIES_ARGS)
async def qmp_capabilities(ctx: Context, args: Args) -> None:
    """In command mode; the session itself handles the negotiation."""
    raise CommandNotFoundError("Capabilities negotiation is already complete, command ignored")


@command("query-version", returns=VERSION_INFO)
async def query_version(ctx: Context, args: Args) -> dict[str, Any]:
    return version_info()


@command("query-commands", returns=Array(COMMAND_INFO))
async def query_commands(ctx: Context, args: Args) -> list[dict[str, str]]:
    return ctx.services.registry.query_commands()


@command("query-qmp-schema", returns=Array(Struct("SchemaInfo", open=True)))
async def query_qmp_schema(ctx: Context, args: Args) -> list[dict[str, Any]]:
    return ctx.services.registry.query_schema()


@command("quit")
async def quit_(ctx: Context, args: Args) -> None:
    """Cancel jobs (with their events), remove exports, reply, then shut down."""
    services = ctx.services
    await services.jobs.cancel_all()
    services.exports.close_all()
    ctx.after_reply.append(services.request_shutdown)
