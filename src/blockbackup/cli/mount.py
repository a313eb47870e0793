"""``blockbackup mount --repo R SNAPSHOT[:DISK]``: serve a snapshot's disk over NBD, read-only.

A daemon (the same one ``serve`` runs) with a ``bb-repo-snapshot`` node exported over NBD;
prints the URI and serves until Ctrl-C. Any NBD client reads it: ``qemu-img convert``,
``nbdcopy``, ``qemu-nbd --connect`` to browse its file systems, QEMU itself.
The key reaches the daemon as a ``secret`` object built in this process, never through a
command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from blockbackup.cli.repo_common import (
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    guarded,
    open_secret,
    secret_object,
    storage_options,
)
from blockbackup.repository.backend import is_remote


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("mount", help="serve a snapshot's disk over NBD (read-only)")
    add_repo_arg(parser)
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="latest, an id or prefix, [:DISK]")
    parser.add_argument("--dir", help="where to create the sockets (default: a new temp dir)")
    add_secret_args(parser)
    add_json_arg(parser)
    parser.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from blockbackup.repository.repo import Repository  # lazy: start-up cost

    secret = open_secret(args)
    repo = Repository.open(args.repo, secret, storage_options(args))
    manifest, disk = repo.select(args.snapshot)  # errors here, before anything is served
    return asyncio.run(_serve(args, secret, manifest.id, disk.name))


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


async def _serve(args: argparse.Namespace, secret: bytes | None, snapshot: str, disk: str) -> int:
    from blockbackup.daemon import Daemon  # lazy: start-up cost
    from blockbackup.daemon_options import parse_args  # lazy: start-up cost

    work = Path(args.dir or tempfile.mkdtemp(prefix="blockbackup-mount-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
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
    argv += ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
    argv += ["--export", f"type=nbd,id=e0,node-name=snapshot,name={name},writable=off"]
    uri = f"nbd+unix:///{name}?socket={sock}"
    info = {"snapshot": snapshot, "disk": disk, "uri": uri}

    def ready() -> None:
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"snapshot {snapshot} disk {disk}: {uri}\nCtrl-C to stop.", flush=True)

    return await Daemon().run(parse_args(argv).options, on_ready=ready)
