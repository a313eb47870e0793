"""Which jobs, nodes and files a ``blockbackup backup`` run made, and cleaning up after a dead one.

Every run names what it creates after itself: a *tag* ``bb-<pid>-<random>`` is the job id
(unless ``--job-id`` says otherwise), ``<tag>-target`` the target node, and
``.<name>.partial-<tag>`` the file the backup is written to before it gets its final name.
Two runs never collide, and a run whose process is gone (killed, or its machine lost the
connection) can be recognised from its names alone: no state file to keep in step.

A dead run's leftovers are undone the way the run itself would have: its job is cancelled
and dismissed, its target node deleted and its partial file removed. One exception keeps a
bitmap right: a job waiting in ``pending`` whose partial file was already renamed to its
final name holds a complete backup, so it is finalized (which applies the bitmap), not
cancelled.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ExecuteError

from blockbackup.cli.qmpclient import CliError, DaemonGone, Monitor

_TAG = re.compile(r"^bb-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{6})$")
_TARGET_SUFFIX = "-target"
_PARTIAL = re.compile(r"^\.(?P<final>.+)\.partial-(?P<tag>bb-[0-9]+-[0-9a-f]{6})$")
#: Seconds a cancelled or finalized job may take to conclude before we give up on it.
CONCLUDE_TIMEOUT = 60.0
_POLL = 0.05


@dataclass(frozen=True)
class RunTag:
    """The names one run gives to what it creates (see the module docstring)."""

    pid: int
    rand: str

    @classmethod
    def new(cls) -> RunTag:
        return cls(os.getpid(), secrets.token_hex(3))

    @classmethod
    def parse(cls, name: str) -> RunTag | None:
        """The tag in a job id or target node name this CLI made, else None."""
        m = _TAG.match(name.removesuffix(_TARGET_SUFFIX))
        return cls(int(m["pid"]), m["rand"]) if m else None

    @property
    def name(self) -> str:
        return f"bb-{self.pid}-{self.rand}"

    @property
    def target_node(self) -> str:
        return f"{self.name}{_TARGET_SUFFIX}"

    def partial_path(self, final: Path) -> Path:
        return final.with_name(f".{final.name}.partial-{self.name}")

    def owner_alive(self) -> bool:
        """Whether the process that made these names still runs (a reused pid counts as
        alive: leaving a leftover is safe, removing a live run's job is not)."""
        if self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def final_path_of(partial: Path) -> Path | None:
    """The final name a partial file was meant to get, or None if it is not one of ours."""
    m = _PARTIAL.match(partial.name)
    return partial.with_name(m["final"]) if m else None


@dataclass
class Leftover:
    """What one run left in a daemon: its jobs, its target node and the node's file."""

    tag: RunTag
    node: str | None = None
    file: Path | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    #: What cleaning removed besides the above (the bitmap the run created).
    removed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"job {j['id']} ({j['status']})" for j in self.jobs]
        if self.node is not None:
            parts.append(f"node {self.node}")
        if self.file is not None and final_path_of(self.file) is not None:
            parts.append(f"file {self.file}")
        return ", ".join(parts + self.removed)


async def find_leftovers(monitor: Monitor, *, dead_only: bool = True) -> list[Leftover]:
    """The jobs and target nodes of this CLI's runs (only those whose process is gone,
    unless ``dead_only`` is false)."""
    nodes, jobs = await monitor.run(("query-named-block-nodes", None), ("query-jobs", None))
    users = await _job_users(monitor)
    found: dict[RunTag, Leftover] = {}
    for node in nodes:
        tag = RunTag.parse(str(node.get("node-name", "")))
        if tag is None or not str(node["node-name"]).endswith(_TARGET_SUFFIX):
            continue
        name = str(node["node-name"])
        file = node.get("file")
        found[tag] = Leftover(tag, name, Path(file) if isinstance(file, str) else None)
    for job in jobs:
        tag = RunTag.parse(str(job["id"]))
        if tag is None:  # a --job-id of ours is found through its target node
            tag = next((t for t, lo in found.items() if lo.node in users.get(job["id"], ())), None)
        if tag is None:
            continue
        found.setdefault(tag, Leftover(tag)).jobs.append(dict(job))
    return [lo for lo in found.values() if not (dead_only and lo.tag.owner_alive())]


async def _job_users(monitor: Monitor) -> dict[str, set[str]]:
    """Job id -> the node names it holds, from the block graph where the daemon shows it."""
    try:
        graph = await monitor.execute("x-debug-query-block-graph")
    except ExecuteError:
        return {}
    names = {n["id"]: n for n in graph["nodes"]}
    users: dict[str, set[str]] = {}
    for edge in graph["edges"]:
        parent, child = names.get(edge["parent"]), names.get(edge["child"])
        if parent and child and parent["type"] == "block-job":
            users.setdefault(parent["name"], set()).add(child["name"])
    return users


async def clean_leftover(monitor: Monitor, leftover: Leftover) -> list[str]:
    """Undo a dead run's leftovers; the problems that remain (empty when all is clean)."""
    problems: list[str] = []
    for job in leftover.jobs:
        try:
            await settle_job(monitor, job, finalize=_was_renamed(leftover.file))
        except (ExecuteError, CliError) as err:
            problems.append(f"job {job['id']}: {err}")
    if leftover.node is not None:
        try:
            await monitor.execute("blockdev-del", {"node-name": leftover.node})
        except ExecuteError as err:
            if "Failed to find node" not in str(err):
                problems.append(f"node {leftover.node}: {err}")
    if leftover.file is not None and final_path_of(leftover.file) is not None:
        try:
            bitmap = await _drop_bitmap(monitor, leftover.file)
            if bitmap is not None:
                leftover.removed.append(bitmap)
        except ExecuteError as err:
            problems.append(f"the bitmap the run created: {err}")
        try:
            leftover.file.unlink(missing_ok=True)
        except OSError as err:
            problems.append(f"file {leftover.file}: {err.strerror}")
    return problems


async def _drop_bitmap(monitor: Monitor, partial: Path) -> str | None:
    """Remove the bitmap the dead run recorded it created, if its backup never completed;
    what was removed."""
    from blockbackup.cli import stale  # lazy: stale imports this module

    return await stale.drop_dead_runs_bitmap(monitor, partial)


def _was_renamed(partial: Path | None) -> bool:
    """Whether a run got as far as giving its (complete) backup its final name."""
    if partial is None:
        return False
    final = final_path_of(partial)
    return final is not None and not partial.exists() and final.exists()


async def settle_job(monitor: Monitor, job: dict[str, Any], *, finalize: bool = False) -> None:
    """Bring a job to an end and dismiss it: finalize it when ``finalize`` and it waits in
    ``pending``, cancel it otherwise, then wait until it concluded."""
    job_id = job["id"]
    current = await job_info(monitor, job_id)  # ``job`` may be an older look at it
    if current is None:
        return
    status = current["status"]
    if status == "pending" and finalize:
        await monitor.execute("job-finalize", {"id": job_id})
    elif status not in ("concluded", "aborting", "null"):
        await monitor.execute("job-cancel", {"id": job_id})
    info = await wait_concluded(monitor, job_id)
    if info is not None:
        await monitor.execute("job-dismiss", {"id": job_id})


async def wait_concluded(
    monitor: Monitor, job_id: str, *, timeout: float = CONCLUDE_TIMEOUT
) -> dict[str, Any] | None:
    """The job's last entry once it concluded, or None if it is gone (auto-dismissed).

    Not interruptible by signals on purpose: it is what stopping waits for.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await job_info(monitor, job_id)
        if info is None or info["status"] == "concluded":
            return info
        if loop.time() > deadline:
            raise CliError(f"job {job_id} did not conclude within {timeout:g} s")
        await asyncio.sleep(_POLL)


async def job_info(monitor: Monitor, job_id: str) -> dict[str, Any] | None:
    jobs = await monitor.execute("query-jobs")
    return next((dict(j) for j in jobs if j.get("id") == job_id), None)


async def clean_dead_runs(monitor: Monitor, say: Callable[[str], None]) -> bool:
    """Clean every dead run's leftovers, saying what was cleaned; False if some remain."""
    clean = True
    for leftover in await find_leftovers(monitor):
        problems = await clean_leftover(monitor, leftover)
        what = leftover.describe()
        if problems:
            clean = False
            say(f"could not clean up after a run that died ({what}): {'; '.join(problems)}")
        else:
            say(f"cleaned up after a run that died: {what}")
    return clean


class Undoing(Protocol):
    """A run being undone: whether its daemon went away, and what could not be undone."""

    daemon_gone: bool
    problems: list[str]


async def undo_step(run: Undoing, what: str, aw: Coroutine[Any, Any, Any]) -> bool:
    """Await one undo step of ``run``; whether it is done (a daemon that is gone took it
    along; a step that failed is noted in ``run.problems``, and the others still run)."""
    if run.daemon_gone:
        aw.close()
        return True
    try:
        await aw
    except DaemonGone:
        run.daemon_gone = True
    except (ExecuteError, CliError) as err:
        run.problems.append(f"{what}: {err}")
        return False
    return True
