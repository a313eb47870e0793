"""The one door to a QEMU's monitor: commands, errors as one sentence, and what it has.

Why a wrapper around ``qemu.qmp``: every command's failure must reach the user as one line
that says which step failed (``blockdev-add: Could not open ...``), a lost connection as
"QEMU's monitor went away", and a QEMU too old to drive must be named before anything is
changed in it (:meth:`Qemu.check_capabilities`).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, StateError

from blockbackup.errors import BlockBackupError
from blockbackup.vm.names import is_ours

#: Commands a pull backup needs (all present since QEMU 5.2; tested with 7.2).
REQUIRED_COMMANDS = (
    "query-block",
    "query-named-block-nodes",
    "query-block-jobs",
    "query-block-exports",
    "blockdev-add",
    "blockdev-del",
    "blockdev-backup",
    "block-job-cancel",
    "transaction",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-merge",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
)


class VmError(BlockBackupError):
    """A pull backup cannot go on; the text is the one line the user reads."""


class QemuGone(VmError):
    """The monitor connection ended: nothing more can be asked of (or undone in) QEMU."""


class QmpFailed(VmError):
    """QEMU refused a command; ``desc`` is QEMU's own text."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc


@dataclass
class Bitmap:
    """One dirty bitmap of a disk's node, as ``query-named-block-nodes`` shows it."""

    name: str
    recording: bool
    persistent: bool
    busy: bool
    granularity: int
    count: int
    inconsistent: bool = False

    @classmethod
    def from_qmp(cls, data: dict[str, Any]) -> Bitmap:
        return cls(
            name=str(data.get("name", "")),
            recording=bool(data.get("recording")),
            persistent=bool(data.get("persistent")),
            busy=bool(data.get("busy")),
            granularity=int(data.get("granularity", 0)),
            count=int(data.get("count", 0)),
            inconsistent=bool(data.get("inconsistent", False)),
        )


@dataclass
class Disk:
    """A writable disk of the VM: a device's top node and the image under it."""

    name: str
    node: str
    format: str
    image: str
    size: int
    qdev: str = ""
    device: str = ""
    bitmaps: list[Bitmap] = field(default_factory=list)

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    def matches(self, wanted: str) -> bool:
        return wanted in (self.name, self.node, self.device, self.qdev)


def _inserted_of(node: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``query-block``'s ``inserted`` that a named node also has."""
    keys = ("node-name", "drv", "file", "image")
    return {k: node[k] for k in keys if k in node}


def _qdev_id(path: str) -> str:
    """``/machine/peripheral/vd0/virtio-backend`` -> ``vd0``."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
        return parts[2]
    return ""


class Qemu:
    """A connected QEMU monitor (the caller owns the connection)."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client

    @property
    def version(self) -> str:
        try:
            v = self.client.greeting.QMP.version.qemu  # type: ignore[union-attr]
            return f"{v.major}.{v.minor}.{v.micro}"
        except AttributeError:
            return "unknown"

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.client.execute(command, args)
        except ExecuteError as err:
            raise QmpFailed(command, str(err)) from None
        except (ExecInterruptedError, StateError, EOFError, OSError) as err:
            raise QemuGone(f"QEMU's monitor went away during {command} ({err})") from None

    async def check_capabilities(self) -> None:
        """Refuse, before changing anything, a QEMU that lacks a command we need."""
        have = {c["name"] for c in await self.execute("query-commands")}
        missing = [c for c in REQUIRED_COMMANDS if c not in have]
        if missing:
            raise VmError(
                f"QEMU {self.version} cannot be driven: it lacks {', '.join(missing)} "
                "(pull backups need QEMU 5.2 or newer; tested with 7.2)"
            )

    async def command_takes(self, command: str, argument: str) -> bool:
        """Whether ``command`` has ``argument`` (``query-qmp-schema``), for options that
        newer QEMUs have and older ones reject."""
        schema = await self.execute("query-qmp-schema")
        by_name = {e.get("name"): e for e in schema}
        entry = next(
            (e for e in schema if e.get("meta-type") == "command" and e.get("name") == command),
            None,
        )
        if entry is None:
            return False
        args = by_name.get(entry.get("arg-type"), {})
        members = list(args.get("members", []))
        for variant in args.get("variants", []) or []:
            members += by_name.get(variant.get("type"), {}).get("members", [])
        return any(m.get("name") == argument for m in members)

    async def name(self) -> str:
        got = await self.execute("query-name")
        return str(got.get("name", "")) if isinstance(got, dict) else ""

    async def _under_our_filter(self, node: str) -> str:
        """The disk node below an interrupted run's copy-before-write filter (which QEMU
        put between the device and the disk until the run's job is cancelled)."""
        graph = await self.execute("x-debug-query-block-graph")
        ids = {n["id"]: n["name"] for n in graph["nodes"]}
        for edge in graph["edges"]:
            if ids.get(edge["parent"]) == node and edge["name"] == "file":
                return str(ids.get(edge["child"], node))
        return node

    async def disks(self) -> list[Disk]:
        """The VM's writable disks with an image inserted, in device order."""
        nodes = {n["node-name"]: n for n in await self.execute("query-named-block-nodes")}
        out = []
        for block in await self.execute("query-block"):
            inserted = block.get("inserted")
            if not inserted or inserted.get("ro"):
                continue
            node = str(inserted.get("node-name", ""))
            if is_ours(node):
                node = await self._under_our_filter(node)
                inserted = {**inserted, **_inserted_of(nodes.get(node, {}))}
            qdev = _qdev_id(str(block.get("qdev", "")))
            device = str(block.get("device", ""))
            name = device or (node if node and not node.startswith("#") else "") or qdev
            image = inserted.get("image", {})
            info = nodes.get(node, {})
            out.append(
                Disk(
                    name=name or node,
                    node=node,
                    format=str(inserted.get("drv", "")),
                    image=str(inserted.get("file", "")),
                    size=int(image.get("virtual-size", 0)),
                    qdev=qdev,
                    device=device,
                    bitmaps=[Bitmap.from_qmp(b) for b in info.get("dirty-bitmaps") or []],
                )
            )
        return out

    async def nodes(self) -> list[dict[str, Any]]:
        return list(await self.execute("query-named-block-nodes"))

    def peer_uid(self) -> int | None:
        """The uid QEMU runs as (unix sockets only), to hand it its scratch directory."""
        # qemu.qmp keeps its transport private; this is read-only use of its stream writer.
        writer = getattr(self.client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
