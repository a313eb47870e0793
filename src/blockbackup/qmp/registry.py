"""The command registry and the dispatcher: QMP requests in, replies out.

Why: a command is declared once, with :func:`command` on its handler::

    @command("block-job-set-speed", args=Struct("q_bjss", [
        Member("device", STR), Member("speed", INT)]))
    async def block_job_set_speed(ctx: Context, args: Args) -> None: ...

and everything else derives from that declaration: argument validation with QEMU's texts,
``query-commands``, ``query-qmp-schema``. The dispatcher applies QEMU's checks on the
request itself in QEMU's order (``QMP input member 'foo' is unexpected``, ``... must be a
string``, ``The command X has not been found``, ``... does not support OOB``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockbackup.errors import BlockBackupError
from blockbackup.qmp.schema import EMPTY, QType, SchemaBuilder, Struct

if TYPE_CHECKING:
    from blockbackup.qmp.context import Context

__all__ = [
    "Args",
    "Command",
    "CommandNotFoundError",
    "EventSpec",
    "Handler",
    "Registry",
    "Request",
    "command",
    "dispatch",
    "event",
]

#: Validated arguments: QMP member names -> values (declared defaults filled in).
Args = dict[str, Any]
Handler = Callable[["Context", Args], Awaitable[Any]]


class CommandNotFoundError(BlockBackupError):
    """QEMU's ``CommandNotFound`` error class."""

    error_class = "CommandNotFound"


@dataclass(frozen=True, eq=False)
class Command:
    """One QMP command: its name, argument and return types, and handler."""

    name: str
    handler: Handler
    args: Struct = EMPTY
    returns: QType = EMPTY
    allow_oob: bool = False
    features: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class EventSpec:
    """One QMP event, declared for ``query-qmp-schema``."""

    name: str
    data: Struct = EMPTY


@dataclass
class Registry:
    """Commands and events by name."""

    commands: dict[str, Command] = field(default_factory=dict)
    events: dict[str, EventSpec] = field(default_factory=dict)

    def add(self, cmd: Command) -> None:
        if cmd.name in self.commands:
            raise ValueError(f"command {cmd.name} declared twice")
        self.commands[cmd.name] = cmd

    def add_event(self, spec: EventSpec) -> None:
        self.events[spec.name] = spec

    def get(self, name: str) -> Command | None:
        return self.commands.get(name)

    def query_commands(self) -> list[dict[str, str]]:
        """``query-commands``."""
        return [{"name": name} for name in self.commands]

    def query_schema(self) -> list[dict[str, Any]]:
        """``query-qmp-schema``: commands, events, and every type they use."""
        builder = SchemaBuilder()
        head: list[dict[str, Any]] = []
        for cmd in self.commands.values():
            entry: dict[str, Any] = {
                "name": cmd.name,
                "meta-type": "command",
                "arg-type": builder.ref(cmd.args),
                "ret-type": builder.ref(cmd.returns),
            }
            if cmd.allow_oob:
                entry["allow-oob"] = True
            if cmd.features:
                entry["features"] = list(cmd.features)
            head.append(entry)
        head.extend(
            {"name": ev.name, "meta-type": "event", "arg-type": builder.ref(ev.data)}
            for ev in self.events.values()
        )
        return head + builder.entries


#: The registry the command modules declare into.
REGISTRY = Registry()


def command(
    name: str,
    *,
    args: Struct = EMPTY,
    returns: QType = EMPTY,
    allow_oob: bool = False,
    features: Iterable[str] = (),
    registry: Registry | None = None,
) -> Callable[[Handler], Handler]:
    """Declare ``name`` with its argument type; the decorated coroutine is its handler.

    The handler receives the validated :data:`Args` and returns the JSON value of
    ``return`` (``None`` means ``{}``).
    """

    def register(fn: Handler) -> Handler:
        target = registry if registry is not None else REGISTRY
        target.add(Command(name, fn, args, returns, allow_oob, tuple(features)))
        return fn

    return register


def event(name: str, data: Struct = EMPTY, *, registry: Registry | None = None) -> None:
    """Declare an event (its data members) for introspection."""
    (registry if registry is not None else REGISTRY).add_event(EventSpec(name, data))


@dataclass(frozen=True, slots=True)
class Request:
    """A request that passed QEMU's input checks."""

    name: str
    arguments: dict[str, Any]
    oob: bool


def check_request(msg: Any, *, oob_enabled: bool) -> Request:
    """QEMU's checks of the request object itself (``qmp_dispatch_check_obj``)."""
    if not isinstance(msg, dict):
        raise BlockBackupError("QMP input must be a JSON object")
    has_exec = has_oob = False
    for key, value in msg.items():
        if key == "execute" or (key == "exec-oob" and oob_enabled):
            if not isinstance(value, str):
                raise BlockBackupError(f"QMP input member '{key}' must be a string")
            if key == "execute":
                has_exec = True
            else:
                has_oob = True
        elif key == "arguments":
            if not isinstance(value, dict):
                raise BlockBackupError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise BlockBackupError(f"QMP input member '{key}' is unexpected")
    if has_exec and has_oob:
        raise BlockBackupError("QMP input member 'execute' clashes with 'exec-oob'")
    if not has_exec and not has_oob:
        raise BlockBackupError("QMP input lacks member 'execute'")
    name = msg["exec-oob"] if has_oob else msg["execute"]
    return Request(name, dict(msg.get("arguments", {})), has_oob)


async def dispatch(registry: Registry, ctx: Context, req: Request, *, keyval: bool = False) -> Any:
    """Find, validate and run one command; return its JSON result.

    The one way a command runs, from a monitor or from the daemon's command line
    (``keyval``: the arguments are key=value strings, converted as QEMU's keyval
    input visitor does).
    """
    cmd = registry.get(req.name)
    if cmd is None:
        raise CommandNotFoundError(f"The command {req.name} has not been found")
    if req.oob and not cmd.allow_oob:
        raise BlockBackupError(f"The command {req.name} does not support OOB")
    args = cmd.args.check(req.arguments, "", keyval=keyval)
    result = await cmd.handler(ctx, args)
    return {} if result is None else result
