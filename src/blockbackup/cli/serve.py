"""``blockbackup serve``: export images over NBD, with a QMP monitor.

The simple way in: a daemon built from the same options as ``blockbackup daemon`` (so it
runs the same handlers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockbackup.cli.qmpclient import EXIT_FAILED


def add_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="export images over NBD, with a QMP monitor")
    serve.add_argument("images", nargs="+", metavar="IMAGE")
    serve.add_argument("--listen", metavar="HOST:PORT", help="NBD over TCP (default: unix socket)")
    serve.add_argument("--dir", help="where to create the sockets (default: a new temp dir)")
    serve.add_argument("--read-only", action="store_true", help="export read-only")
    serve.add_argument("--json", action="store_true", help="print the URIs as JSON")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(
        serve(
            args.images,
            listen=args.listen,
            directory=args.dir,
            read_only=args.read_only,
            as_json=args.json,
        )
    )


def node_names(images: list[str]) -> list[str]:
    """A valid, unique node-name per image, from its file name (``disk-1.img`` -> ``disk-1``)."""
    names: list[str] = []
    for image in images:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(image).stem)[:24] or "disk"
        if not stem[0].isalpha():
            stem = f"disk-{stem}"[:24]
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def serve_options(
    images: list[str], names: list[str], nbd_addr: str, qmp_path: str, read_only: bool
) -> list[str]:
    """The ``blockbackup daemon`` arguments that serve ``images``."""
    argv: list[str] = []
    for image, name in zip(images, names, strict=True):
        node = {
            "driver": "raw",
            "node-name": name,
            "read-only": read_only,
            "file": {"driver": "file", "filename": os.path.abspath(image)},
        }
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--nbd-server", nbd_addr]
    for name in names:
        writable = "off" if read_only else "on"
        argv += ["--export", f"type=nbd,id={name},node-name={name},name={name},writable={writable}"]
    argv += [
        "--chardev",
        f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
        "--monitor",
        "chardev=qmp0",
    ]
    return argv


async def serve(
    images: list[str],
    *,
    listen: str | None,
    directory: str | None,
    read_only: bool,
    as_json: bool,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run a daemon serving ``images`` until SIGINT/SIGTERM or ``quit``."""
    from blockbackup.daemon import Daemon  # lazy: start-up cost of the other commands
    from blockbackup.daemon_options import parse_args

    for image in images:
        if not os.path.isfile(image) and not Path(image).is_block_device():
            print(f"blockbackup serve: no such image: {image}", file=sys.stderr)
            return EXIT_FAILED
    work = Path(directory or tempfile.mkdtemp(prefix="blockbackup-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    names = node_names(images)
    qmp_path = str(work / "qmp.sock")
    if listen:
        host, _, port = listen.rpartition(":")
        nbd_addr = f"addr.type=inet,addr.host={host or '127.0.0.1'},addr.port={port or '10809'}"
        uris = [f"nbd://{host or '127.0.0.1'}:{port or '10809'}/{name}" for name in names]
    else:
        sock = str(work / "nbd.sock")
        nbd_addr = f"addr.type=unix,addr.path={sock}"
        uris = [f"nbd+unix:///{name}?socket={sock}" for name in names]
    args = parse_args(serve_options(images, names, nbd_addr, qmp_path, read_only))
    exports = [
        {"image": os.path.abspath(i), "node": n, "uri": u}
        for i, n, u in zip(images, names, uris, strict=True)
    ]
    info: dict[str, Any] = {"qmp": qmp_path, "exports": exports}

    def ready() -> None:
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            print(f"QMP monitor: {qmp_path}")
            for export in exports:
                print(f"{export['node']}: {export['uri']}")
            print("Ctrl-C to stop.", flush=True)
        if on_ready is not None:
            on_ready(info)

    return await Daemon().run(args.options, on_ready=ready)
