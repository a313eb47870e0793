"""``blockbackup mount --repo R SNAPSHOT[:DISK] [--writable [--keep-overlay FILE]]``: serve a
snapshot's disk over NBD.

A daemon (the same one ``serve`` runs) with a ``bb-repo-snapshot`` node exported over NBD;
prints the URI and serves until Ctrl-C (or SIGTERM). Any NBD client reads it: ``qemu-img
convert``, ``nbdcopy``, ``qemu-nbd --connect`` to browse its file systems, QEMU itself.
The key reaches the daemon as a ``secret`` object built in this process, never through a
command line.

``--writable`` (instant recovery: boot a VM from a backup): the export is a qcow2 overlay
whose backing is the snapshot node, given by reference (the engine's qcow2 driver takes a
``backing`` node, so no backing file name and no second process are needed). Writes land
in the overlay, reads of what was not written go to the snapshot; the repository is never
written. The overlay lives in a private temporary directory and is removed at exit, unless
``--keep-overlay FILE`` names where to create it and keep it (it then holds the changes
over that snapshot, as a qcow2 image with no backing file name: ``qemu-img rebase -u -b``
onto a restore of the snapshot makes it a complete image again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn

from blockbackup.cli.repo_common import (
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    guarded,
    open_secret,
    secret_object,
    storage_options,
)
from blockbackup.errors import BlockBackupError
from blockbackup.repository.backend import is_remote


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("mount", help="serve a snapshot's disk over NBD")
    add_repo_arg(parser)
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="latest, an id or prefix, [:DISK]")
    parser.add_argument("--dir", help="where to create the sockets (default: a new temp dir)")
    parser.add_argument(
        "--writable",
        action="store_true",
        help="accept writes into a throw-away overlay (the repository is never changed)",
    )
    parser.add_argument(
        "--keep-overlay",
        metavar="FILE",
        help="with --writable: create the overlay as FILE (new) and keep it at exit",
    )
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.repository.repo import Repository  # lazy: start-up cost

    if args.keep_overlay is not None and not args.writable:
        raise BlockBackupError("--keep-overlay needs --writable")
    if args.keep_overlay is not None and os.path.lexists(args.keep_overlay):
        raise BlockBackupError(f"{args.keep_overlay} exists: the overlay must be a new file")
    secret = open_secret(args)
    with Repository.open(args.repo, secret, storage_options(args)) as repo:
        manifest, disk = repo.select(args.snapshot)  # errors here, before anything is served
    with contextlib.ExitStack() as cleanup:
        work = _private_dir(args.dir, "blockbackup-mount-", cleanup)
        overlay: Path | None = None
        if args.writable:
            overlay = _create_overlay(args.keep_overlay, disk.size, cleanup)
        return asyncio.run(_serve(args, secret, manifest.id, disk.name, work, overlay))


def _private_dir(given: str | None, prefix: str, cleanup: contextlib.ExitStack) -> Path:
    """``given`` (made if missing, kept), or a new temporary directory removed at exit."""
    if given is None:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        cleanup.callback(shutil.rmtree, path, ignore_errors=True)
        return path
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _create_overlay(keep: str | None, size: int, cleanup: contextlib.ExitStack) -> Path:
    """A new empty qcow2 image of ``size`` (the snapshot's disk) to take the writes."""
    from blockbackup.block.qcow2.create import build_image  # lazy: start-up cost

    if keep is None:
        path = _private_dir(None, "blockbackup-overlay-", cleanup) / "overlay.qcow2"
    else:
        path = Path(os.path.abspath(keep))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(build_image(size))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _options(
    repo: str, snapshot: str, disk: str, key: dict[str, Any] | None, storage: dict[str, str]
) -> dict[str, Any]:
    node: dict[str, Any] = {
        "driver": "bb-repo-snapshot",
        "node-name": "snapshot",
        "repository": repo if is_remote(repo) else os.path.abspath(repo),
        **storage,
        "snapshot": snapshot,
        "disk": disk,
        "read-only": True,
    }
    if key is not None:
        node["key-secret"] = key["id"]
    return node


def _overlay_options(path: Path) -> dict[str, Any]:
    """A qcow2 node over ``path`` whose backing is the snapshot node, by reference."""
    return {
        "driver": "qcow2",
        "node-name": "overlay",
        "file": {"driver": "file", "filename": str(path)},
        "backing": "snapshot",
    }


async def _serve(
    args: argparse.Namespace,
    secret: bytes | None,
    snapshot: str,
    disk: str,
    work: Path,
    overlay: Path | None,
) -> int:
    from blockbackup.daemon import Daemon  # lazy: start-up cost
    from blockbackup.daemon_options import parse_args  # lazy: start-up cost

    sock = work / "nbd.sock"
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in disk)
    key = secret_object(secret)
    argv: list[str] = []
    if key is not None:
        argv += ["--object", f"secret,id={key['id']},data={key['data']},format=base64"]
    argv += [
        "--blockdev",
        json.dumps(_options(args.repo, snapshot, disk, key, storage_options(args))),
    ]
    exported, writable = "snapshot", "off"
    if overlay is not None:
        argv += ["--blockdev", json.dumps(_overlay_options(overlay))]
        exported, writable = "overlay", "on"
    argv += ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
    argv += ["--export", f"type=nbd,id=e0,node-name={exported},name={name},writable={writable}"]
    uri = f"nbd+unix:///{name}?socket={sock}"
    kept = args.keep_overlay is not None
    info = {
        "snapshot": snapshot,
        "disk": disk,
        "uri": uri,
        "writable": overlay is not None,
        "overlay": None if overlay is None else str(overlay),
        "keep_overlay": kept,
    }
    console = Console(stderr=True)
    # opening takes a while on a big repository (every pack index is loaded): say so
    status = Progress(
        SpinnerColumn(),
        TextColumn(f"mount: opening snapshot {snapshot}"),
        console=console,
        disable=args.json or not console.is_terminal,
        transient=True,
    )
    status.add_task("open", total=None)
    status.start()

    def ready() -> None:
        status.stop()
        if args.json:
            print(json.dumps(info), flush=True)
            return
        lines = [f"snapshot {snapshot} disk {disk}: {uri}"]
        if overlay is not None:
            where = f"kept as {overlay}" if kept else "thrown away at exit"
            lines.append(f"writable: writes go to an overlay, {where}")
        lines.append("Ctrl-C to stop.")
        print("\n".join(lines), flush=True)

    try:
        return await Daemon("mount").run(parse_args(argv).options, on_ready=ready)
    finally:
        status.stop()
