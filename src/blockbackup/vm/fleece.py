"""Point-in-time views of a VM's disks inside QEMU, exported over NBD; and their removal.

The sequence (QEMU 7.2; docs/vm-backup.md has the reasons):

1. ``nbd-server-start`` on a unix socket in the run's owner-only scratch directory (first,
   so that a QEMU already running someone else's NBD server is refused before anything
   changes).
2. Per disk, create a temporary qcow2 (the *fleece* image), allocate its file's worst
   case (``vm/reserve.py``: unless ``on-cbw-error`` exists or ``--thin-scratch``), and
   ``blockdev-add`` it with the disk's node as its backing.
3. One ``transaction`` for all disks: per disk ``block-dirty-bitmap-add`` (the new
   checkpoint, persistent); for an incremental, a disabled bitmap on the fleece node
   filled by ``block-dirty-bitmap-merge`` from the checkpoint it starts from (a frozen copy
   of it at this instant; the checkpoint itself keeps recording, so a run killed at any
   point leaves it usable); and ``blockdev-backup sync=none`` from the disk into its
   fleece image: QEMU inserts its copy-before-write filter above the disk, so every guest
   write first copies the old data into the fleece image. One transaction is one point in
   time for every disk.
4. ``block-export-add`` of each fleece node, read-only, with the frozen copy as the
   ``qemu:dirty-bitmap:`` context for an incremental.

Why not ``copy-before-write`` + ``snapshot-access`` nodes: they must sit *above* the disk
node, under the guest's device, and QEMU 7.2 cannot move a device onto a new node (that
needs ``blockdev-replace``, not in 7.2); the backup job inserts the same filter itself.

Teardown (:func:`remove_objects`) is the same code for a run's own objects and for what a
killed run left: exports, then the NBD server, then jobs (cancelling a ``sync=none`` job
drops the filter and puts the guest back on its disk), then nodes, then files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from blockbackup.block.qcow2.create import create_qcow2_file
from blockbackup.vm import names
from blockbackup.vm.checkpoints import INCREMENTAL, Plan, can_keep_checkpoint
from blockbackup.vm.qemu import Disk, Qemu, QemuGone, QmpFailed, VmError
from blockbackup.vm.reserve import reserve

#: Seconds to wait for QEMU to finish cancelling a job or deleting an export.
SETTLE_TIMEOUT = 30.0
#: The longest path a unix socket can have (sun_path, with its terminating zero).
MAX_SOCKET_PATH = 107


@dataclass
class View:
    """One disk's point-in-time view: the names of everything made for it in QEMU."""

    disk: Disk
    plan: Plan
    fleece: str
    file_node: str
    filter_node: str
    #: An incremental's frozen copy of its checkpoint (a bitmap of the fleece node).
    frozen: str
    job: str
    export: str
    image: str
    #: The checkpoint this backup starts (None: the disk cannot keep one).
    new_checkpoint: str | None

    @property
    def export_name(self) -> str:
        """The NBD export's name: the export's id, unique where disk names may not be."""
        return self.export


@dataclass
class Session:
    """One run's objects in one QEMU, and its scratch directory."""

    qemu: Qemu
    run: str
    scratch: str
    qmp_socket: str
    views: list[View] = field(default_factory=list)
    server_started: bool = False
    transaction_done: bool = False
    #: QEMU 10.1+: a copy-before-write failure breaks the backup, not the guest's write.
    break_snapshot: bool = False
    #: Allocate each fleece image's worst case before the job (``vm/reserve.py``), so a
    #: full scratch file system can never fail a guest's write.
    reserve: bool = True

    def __post_init__(self) -> None:
        # QEMU resolves relative paths against its own working directory, not ours
        self.scratch = os.path.abspath(self.scratch)

    @property
    def prefix(self) -> str:
        return names.run_prefix(self.run)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.scratch, names.run_dir_name(self.run))

    @property
    def nbd_socket(self) -> str:
        return os.path.join(self.run_dir, names.NBD_SOCKET)

    # -- building ----------------------------------------------------------------------------

    def _make_run_dir(self) -> None:
        if len(self.nbd_socket) > MAX_SOCKET_PATH:
            raise VmError(f"--scratch-dir {self.scratch} is too long a path for a unix socket")
        try:
            os.mkdir(self.run_dir, 0o700)
        except FileNotFoundError:
            raise VmError(f"scratch directory {self.scratch} does not exist") from None
        except PermissionError:
            raise VmError(f"scratch directory {self.scratch} is not writable") from None
        with open(os.path.join(self.run_dir, names.OWNER_FILE), "w") as f:
            f.write(os.path.realpath(self.qmp_socket))
        self._hand_to_qemu(self.run_dir)

    def _hand_to_qemu(self, path: str) -> None:
        """Run as root for a QEMU of another user: QEMU must open the scratch files."""
        uid = self.qemu.peer_uid()
        if uid is not None and os.geteuid() == 0 and uid != 0:
            os.chown(path, uid, -1)

    async def start(self, plans: list[tuple[Disk, Plan]], granularity: int) -> None:
        """Steps 1-4 of the module docstring; on failure the caller runs :meth:`teardown`."""
        await asyncio.to_thread(self._make_run_dir)
        await self._start_server()
        checkpoint = names.checkpoint_name(self.run)
        for n, (disk, plan) in enumerate(plans):
            base = f"{self.prefix}{n}"
            view = View(
                disk=disk,
                plan=plan,
                fleece=f"{base}-fleece",
                file_node=f"{base}-file",
                filter_node=f"{base}-cbw",
                frozen=f"{base}-frozen",
                job=base,
                export=base,
                image=os.path.join(self.run_dir, f"{n}.fleece.qcow2"),
                new_checkpoint=checkpoint if can_keep_checkpoint(disk) else None,
            )
            await asyncio.to_thread(create_qcow2_file, view.image, disk.size)
            if self.reserve:
                await asyncio.to_thread(
                    reserve, view.image, disk.size, scratch=self.scratch, disk=disk.name
                )
            await asyncio.to_thread(self._hand_to_qemu, view.image)
            self.views.append(view)
            await self.qemu.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": view.fleece,
                    "file": {"driver": "file", "node-name": view.file_node, "filename": view.image},
                    "backing": disk.node,
                    "discard": "unmap",
                },
            )
        await self.qemu.execute("transaction", {"actions": self._actions(granularity)})
        self.transaction_done = True
        for view in self.views:
            export: dict[str, object] = {
                "type": "nbd",
                "id": view.export,
                "node-name": view.fleece,
                "name": view.export_name,
                "writable": False,
            }
            if view.plan.mode == INCREMENTAL:
                export["bitmaps"] = [view.frozen]
            await self.qemu.execute("block-export-add", export)

    async def _start_server(self) -> None:
        addr = {"type": "unix", "data": {"path": self.nbd_socket}}
        try:
            await self.qemu.execute("nbd-server-start", {"addr": addr})
        except QmpFailed as exc:
            if "already running" not in exc.desc:
                raise
            raise VmError(
                "QEMU already runs an NBD server that blockbackup did not start (QEMU runs "
                "one at a time): stop it (nbd-server-stop) or back up when it is done"
            ) from None
        self.server_started = True

    def _actions(self, granularity: int) -> list[dict[str, object]]:
        actions: list[dict[str, object]] = []
        for view in self.views:
            node = view.disk.node
            if view.new_checkpoint is not None:
                add = {
                    "node": node,
                    "name": view.new_checkpoint,
                    "persistent": True,
                    "granularity": granularity,
                }
                actions.append({"type": "block-dirty-bitmap-add", "data": add})
            if view.plan.mode == INCREMENTAL:
                frozen = {
                    "node": view.fleece,
                    "name": view.frozen,
                    "granularity": granularity,
                    "disabled": True,
                }
                merge = {
                    "node": view.fleece,
                    "target": view.frozen,
                    "bitmaps": [{"node": node, "name": view.plan.checkpoint}],
                }
                actions.append({"type": "block-dirty-bitmap-add", "data": frozen})
                actions.append({"type": "block-dirty-bitmap-merge", "data": merge})
            backup: dict[str, object] = {
                "job-id": view.job,
                "device": node,
                "target": view.fleece,
                "sync": "none",
                "filter-node-name": view.filter_node,
            }
            if self.break_snapshot:
                backup["on-cbw-error"] = "break-snapshot"
            actions.append({"type": "blockdev-backup", "data": backup})
        return actions

    # -- undoing -----------------------------------------------------------------------------

    async def teardown(self) -> list[str]:
        """Remove every QEMU object and file of this run; what could not be removed."""
        problems = await remove_objects(self.qemu, self.prefix, stop_server=self.server_started)
        self.server_started = False
        await asyncio.to_thread(shutil.rmtree, self.run_dir, True)
        return problems

    async def release(self, view: View) -> list[str]:
        """Remove one view as soon as its disk is read: the guest stops paying the
        copy-before-write cost for that disk while the others are still read."""
        problems = await remove_objects(self.qemu, "", stop_server=False, exact=view.job)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, view.image)
        return problems

    async def keep_new_checkpoints(self) -> list[str]:
        """After the commit: each disk keeps only the checkpoint this snapshot recorded."""
        problems: list[str] = []
        disks = {d.node: d for d in await self.qemu.disks()}
        for view in self.views:
            disk = disks.get(view.disk.node)
            if disk is None:
                continue
            for name in _stale(disk, view.new_checkpoint):
                with _collect(problems):
                    await self.qemu.execute(
                        "block-dirty-bitmap-remove", {"node": disk.node, "name": name}
                    )
        return problems

    async def remove_new_checkpoints(self) -> list[str]:
        """After a failure: the checkpoints are as before the run (the one an incremental
        started from never stopped recording; its frozen copy went with the fleece node)."""
        problems: list[str] = []
        if not self.transaction_done:
            return problems
        for view in self.views:
            if view.new_checkpoint is None:
                continue
            with _collect(problems):
                await self.qemu.execute(
                    "block-dirty-bitmap-remove",
                    {"node": view.disk.node, "name": view.new_checkpoint},
                )
        return problems


def _stale(disk: Disk, keep: str | None) -> list[str]:
    return [b.name for b in disk.bitmaps if names.is_checkpoint(b.name) and b.name != keep]


@contextlib.contextmanager
def _collect(problems: list[str]) -> Iterator[None]:
    """Keep undoing after a step fails (each failure is reported); a lost monitor ends it."""
    try:
        yield
    except QemuGone:
        raise
    except VmError as exc:
        problems.append(str(exc))


async def remove_objects(
    qemu: Qemu, prefix: str, *, stop_server: bool, exact: str | None = None
) -> list[str]:
    """Delete every export, job and node whose name starts with ``prefix`` (and the NBD
    server when ``stop_server``), in the order that frees each before the next; the
    files of the deleted nodes' scratch directories go too. Returns what failed.

    ``exact``: only the objects of one view (named ``exact`` or ``exact-...``), and no
    directory (the run's other views still use it)."""
    if exact is not None:
        prefix = exact

        def mine(name: str) -> bool:
            return name == exact or name.startswith(f"{exact}-")
    else:

        def mine(name: str) -> bool:
            return name.startswith(prefix)

    problems: list[str] = []
    exports = [e["id"] for e in await qemu.execute("query-block-exports") if mine(e["id"])]
    for export in exports:
        with _collect(problems):
            await qemu.execute("block-export-del", {"id": export, "mode": "hard"})
    await _settle(qemu, "query-block-exports", "id", exports)
    if stop_server:
        with _collect(problems):
            await qemu.execute("nbd-server-stop")
    jobs = [j["device"] for j in await qemu.execute("query-block-jobs") if mine(j["device"])]
    for job in jobs:
        with _collect(problems):
            await qemu.execute("block-job-cancel", {"device": job, "force": True})
    await _settle(qemu, "query-block-jobs", "device", jobs)
    nodes = await qemu.nodes()
    ours = [n for n in nodes if mine(str(n["node-name"]))]
    dirs = {
        os.path.dirname(str(n.get("file", "")))
        for n in ours
        if str(n["node-name"]).endswith("-file")
    }
    # the fleece (format) nodes first: deleting one deletes the file node it opened
    ours.sort(key=lambda n: not str(n["node-name"]).endswith("-fleece"))
    for node in ours:
        try:
            await qemu.execute("blockdev-del", {"node-name": node["node-name"]})
        except QmpFailed as exc:
            if "Failed to find node" not in exc.desc:
                problems.append(str(exc))
    for directory in dirs if exact is None else ():
        if names.is_run_dir_name(os.path.basename(directory)):
            await asyncio.to_thread(shutil.rmtree, directory, True)
    return problems


async def _settle(qemu: Qemu, query: str, key: str, gone: list[str]) -> None:
    """Wait until ``query`` lists none of ``gone`` (QEMU finishes some deletions later)."""
    if not gone:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while any(item[key] in gone for item in await qemu.execute(query)):
        if loop.time() > deadline:
            raise VmError(f"QEMU did not finish removing {', '.join(gone)}")
        await asyncio.sleep(0.05)


async def remove_leftovers(qemu: Qemu, qmp_socket: str, scratch: str) -> list[str]:
    """What killed runs left in this QEMU and in ``scratch``: removed; what was found.

    The monitor serves one client at a time and this run holds it, so every ``bbvm-``
    object in QEMU belongs to a run that is gone. The NBD server is a killed run's when it
    listens in a scratch directory of ours that names this QEMU's monitor.
    """
    found = [e["id"] for e in await qemu.execute("query-block-exports") if names.is_ours(e["id"])]
    found += [
        j["device"] for j in await qemu.execute("query-block-jobs") if names.is_ours(j["device"])
    ]
    found += [n["node-name"] for n in await qemu.nodes() if names.is_ours(n["node-name"])]
    server = bool(found) or bool(await asyncio.to_thread(our_listening_sockets, qmp_socket))
    problems = await remove_objects(qemu, names.OBJECT_PREFIX, stop_server=False)
    if server:
        try:
            await qemu.execute("nbd-server-stop")
            found.append("NBD server")
        except QmpFailed:
            pass  # not running
    for directory in await asyncio.to_thread(_our_run_dirs, scratch, qmp_socket):
        await asyncio.to_thread(shutil.rmtree, directory, True)
        found.append(directory)
    if problems:
        raise VmError(f"cannot remove what an interrupted run left in QEMU: {problems[0]}")
    return sorted(set(f for f in found if not f.endswith(("-file", "-cbw"))))


def _owner_of(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, names.OWNER_FILE)) as f:
            return f.read().strip()
    except OSError:
        return None


def _our_run_dirs(scratch: str, qmp_socket: str) -> list[str]:
    """Scratch directories of runs against this QEMU's monitor."""
    me = os.path.realpath(qmp_socket)
    try:
        entries = os.listdir(scratch)
    except OSError:
        return []
    out = []
    for entry in entries:
        path = os.path.join(scratch, entry)
        if names.is_run_dir_name(entry) and _owner_of(path) == me:
            out.append(path)
    return out


def our_listening_sockets(qmp_socket: str) -> list[str]:
    """Listening unix sockets (``/proc/net/unix``) of ours that belong to this QEMU: the
    NBD server of a run killed before it added an export."""
    me = os.path.realpath(qmp_socket)
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[3] != "00010000":
            continue
        path = fields[7]
        directory = os.path.dirname(path)
        if (
            os.path.basename(path) == names.NBD_SOCKET
            and names.is_run_dir_name(os.path.basename(directory))
            and _owner_of(directory) == me
        ):
            out.append(path)
    return out
