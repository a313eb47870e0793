"""What a dead ``backup`` (or ``restore``) run leaves outside the daemon: its partial file,
and the record of a bitmap it created.

Why a record: ``--start-bitmap NAME`` creates NAME in the same transaction that starts the
backup. If the run dies before its backup got its final name, NAME tracks changes since
the start of a backup that does not exist; a later ``--incremental NAME`` would then build
on a full backup that was never made. The bitmap's name is the user's, so nothing in the
daemon says who made it: the run writes ``.<target>.partial-<tag>.bitmap`` (``{"node",
"bitmap"}``) next to its partial file before the transaction, and removes it when it ends
(the bitmap then is the user's, or was removed by the run's own undo). A record whose
run's process is gone (same user, pid not alive) proves the bitmap is a dead run's: it is
removed unless the backup is complete (the partial file is gone and the final file
exists: the run died between the rename and the finalize, so the bitmap is right).

Why the partial files: after a daemon restart nothing in the daemon names a dead run's
partial file any more, so the next backup to the same target removes those of dead runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from qemu.qmp import ExecuteError

from blockbackup.cli.qmpclient import Monitor
from blockbackup.cli.runs import RunTag, final_path_of

_RECORD_SUFFIX = ".bitmap"


def record_path(partial: Path) -> Path:
    return partial.with_name(partial.name + _RECORD_SUFFIX)


def write_record(partial: Path, node: str, bitmap: str) -> None:
    """Say, next to ``partial``, that this run is creating ``bitmap`` on ``node``."""
    path = record_path(partial)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"node": node, "bitmap": bitmap}, f)
        f.flush()
        os.fsync(f.fileno())


def remove_record(partial: Path) -> None:
    record_path(partial).unlink(missing_ok=True)


def _read_record(path: Path) -> tuple[str, str] | None:
    try:
        data = json.loads(path.read_text())
        return str(data["node"]), str(data["bitmap"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def drop_dead_runs_bitmap(monitor: Monitor, partial: Path) -> str | None:
    """Remove the bitmap a dead run recorded next to ``partial`` (unless its backup is
    complete) and the record; what was removed, for the user, or None."""
    path = record_path(partial)
    record = _read_record(path) if path.exists() else None
    final = final_path_of(partial)
    complete = final is not None and not partial.exists() and final.exists()
    removed = None
    if record is not None and not complete:
        node, bitmap = record
        try:
            await monitor.execute("block-dirty-bitmap-remove", {"node": node, "name": bitmap})
            removed = f"bitmap {bitmap} of node {node} (its backup never completed)"
        except ExecuteError as err:
            if "not found" not in str(err).lower():
                raise
    path.unlink(missing_ok=True)
    return removed


_DEAD_FILE = re.compile(r"^\.(?P<final>.+)\.partial-(?P<tag>bb-[0-9]+-[0-9a-f]{6})(\.bitmap)?$")


def _dead_partials(final: Path) -> list[Path]:
    """The partial paths (existing, or named by a bitmap record) of ``final`` whose run is
    gone and whose files are ours."""
    found: set[Path] = set()
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return []
    for entry in entries:
        m = _DEAD_FILE.match(entry.name)
        if m is None or m["final"] != final.name:
            continue
        tag = RunTag.parse(m["tag"])
        try:
            mine = entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if tag is None or not mine or not entry.is_file(follow_symlinks=False):
            continue
        if not tag.owner_alive():
            found.add(tag.partial_path(final))
    return sorted(found)


async def clean_dead_files(monitor: Monitor, final: Path, say: Callable[[str], None]) -> None:
    """Remove what runs that died left next to ``final``: their bitmaps (see the module
    docstring) and partial files, saying what went."""
    for partial in _dead_partials(final):
        try:
            bitmap = await drop_dead_runs_bitmap(monitor, partial)
        except ExecuteError as err:
            say(f"could not remove a bitmap a run that died created ({partial.name}): {err}")
            continue
        if bitmap is not None:
            say(f"removed {bitmap}, created by a run that died")
        _remove_partial(partial, say)


def remove_dead_partials(final: Path, say: Callable[[str], None]) -> None:
    """Remove the partial files that runs which died left next to ``final`` (a restore's:
    no bitmap is involved), saying what went."""
    for partial in _dead_partials(final):
        _remove_partial(partial, say)


def _remove_partial(partial: Path, say: Callable[[str], None]) -> None:
    if partial.exists():
        try:
            partial.unlink()
        except OSError as err:
            say(f"could not remove {partial} of a run that died: {err.strerror}")
            return
        say(f"removed the partial file of a run that died: {partial}")
