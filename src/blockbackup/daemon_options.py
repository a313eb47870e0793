"""qemu-storage-daemon's command line: option list, key=value syntax, JSON syntax.

Why this is separate from the daemon: the parsing rules are QEMU's and pure (no I/O), so
they are tested alone. :func:`parse_args` returns the options *in order* (as
qemu-storage-daemon processes them) with each value already turned into the dict the
matching QMP command takes; the daemon then runs the same handlers as QMP.

Key=value syntax (QEMU's ``keyval``): ``a=1,b.c=2,l.0=x,l.1=y`` gives
``{"a": "1", "b": {"c": "2"}, "l": ["x", "y"]}``; ``,,`` is a literal comma; an option
may name an implied first key (``--object secret,id=s`` means ``qom-type=secret``,
``--chardev socket,...`` means backend ``socket``, ``--monitor m0`` means
``chardev=m0``). A value starting with ``{`` is JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from blockbackup.errors import BlockBackupError

__all__ = ["DaemonArgs", "DaemonOption", "OptionsError", "parse_args", "parse_keyval"]

#: Option name -> implied first key (None: every item needs ``key=``).
OPTIONS: dict[str, str | None] = {
    "blockdev": None,
    "object": "qom-type",
    "nbd-server": None,
    "export": "type",
    "chardev": "backend",
    "monitor": "chardev",
}
#: Options whose value may also be JSON.
JSON_OPTIONS = {"blockdev", "object", "nbd-server", "export", "monitor"}

_KEY_FRAGMENT = re.compile(r"[A-Za-z0-9_-]+\Z")

USAGE = """\
Usage: blockbackup daemon [options]
qemu-storage-daemon compatible storage daemon (backups, NBD exports, QMP)

  -h, --help                display this help and exit
  -V, --version             output version information and exit
  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,<driver options>]   configure a block backend (or JSON)
  --chardev socket,id=<id>,path=<path>|host=<h>,port=<p>[,server=on][,wait=off]
                            configure a character device for a monitor
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on|off]
             [,description=<d>][,bitmaps=...][,allocation-depth=on|off]
                            export the specified block node over NBD
  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                            configure a QMP monitor
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,tls-creds=<id>]
               [,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,tls-creds=<id>][,max-connections=<n>]
                            start an NBD server for exporting block nodes
  --object help | secret,id=<id>,data=<d>|file=<f>
         | tls-creds-x509,id=<id>,dir=<dir>,endpoint=server|client[,verify-peer=on|off]
                            create a new object
  --pidfile <path>          write process ID to a file after startup
  --daemonize               daemonize the process, and have the parent exit
                            once startup is complete
"""


class OptionsError(BlockBackupError):
    """A malformed command line."""


@dataclass(frozen=True, slots=True)
class DaemonOption:
    """One option, in command-line order: its name and its value as a dict.

    ``keyval`` tells whether the values are strings from key=value syntax (the handler
    then converts them as QEMU's keyval input visitor does).
    """

    name: str
    value: dict[str, Any]
    keyval: bool


@dataclass(slots=True)
class DaemonArgs:
    """The whole command line."""

    options: list[DaemonOption] = field(default_factory=list)
    pidfile: str | None = None
    daemonize: bool = False
    help: bool = False
    version: bool = False


def _split_items(text: str) -> list[str]:
    """Split at single commas; ``,,`` is a comma inside a value."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """QEMU's keyval syntax to a nested dict of strings (lists from numeric keys)."""
    root: dict[str, Any] = {}
    for index, item in enumerate(_split_items(text)):
        if item == "" and index > 0:
            continue
        if "=" not in item:
            if index == 0 and implied_key is not None:
                key, value = implied_key, item
            else:
                raise OptionsError(f"Expected '=' after parameter '{item}'")
        else:
            key, value = item.split("=", 1)
        parts = key.split(".")
        for part in parts:
            if not _KEY_FRAGMENT.match(part):
                raise OptionsError(f"Invalid parameter '{key}'")
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise OptionsError(f"Parameters '{prefix}.*' used inconsistently")
            node = child
        last = parts[-1]
        if isinstance(node.get(last), dict):
            raise OptionsError(f"Parameters '{key}.*' used inconsistently")
        node[last] = value
    return _lists(root, "")


def _lists(node: dict[str, Any], path: str) -> dict[str, Any]:
    """Turn every dict whose keys are all decimal indexes into a list."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        sub = f"{path}.{key}" if path else key
        out[key] = _listify(value, sub) if isinstance(value, dict) else value
    return out


def _listify(value: dict[str, Any], path: str) -> Any:
    converted = _lists(value, path)
    if converted and all(k.isdigit() for k in converted):
        items = []
        for i in range(len(converted)):
            if str(i) not in converted:
                raise OptionsError(f"Parameter '{path}.{i}' missing")
            items.append(converted[str(i)])
        return items
    if any(k.isdigit() for k in converted):
        raise OptionsError(f"Parameters '{path}.*' used inconsistently")
    return converted


def parse_value(name: str, text: str) -> DaemonOption:
    """One option's value, in JSON or key=value syntax."""
    if name in JSON_OPTIONS and text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise OptionsError(f"--{name}: JSON parse error, {exc}") from exc
        if not isinstance(value, dict):
            raise OptionsError(f"--{name}: must be a JSON object")
        return DaemonOption(name, value, keyval=False)
    return DaemonOption(name, parse_keyval(text, OPTIONS[name]), keyval=True)


def parse_args(argv: list[str]) -> DaemonArgs:
    """The daemon's command line, options kept in order."""
    out = DaemonArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            out.help = True
            continue
        if arg in ("-V", "--version"):
            out.version = True
            continue
        if arg == "--daemonize":
            out.daemonize = True
            continue
        if not arg.startswith("-"):
            raise OptionsError(f"Unexpected argument: {arg}")
        name, eq, value = arg.lstrip("-").partition("=")
        if name not in OPTIONS and name != "pidfile":
            raise OptionsError(f"unrecognized option '{arg}'")
        if not eq:
            if i >= len(argv):
                raise OptionsError(f"option '{arg}' requires an argument")
            value = argv[i]
            i += 1
        if name == "pidfile":
            out.pidfile = value
            continue
        out.options.append(parse_value(name, value))
    return out
