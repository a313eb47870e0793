"""``blockbackup serve``: export images over NBD, with a QMP monitor.

The simple way in: a daemon built from the same options as ``blockbackup daemon`` (so it
runs the same handlers). Everything a user can get wrong is checked here first and
reported in one line (exit 1): a missing or unreadable image, a file in a format that
cannot be served as it is, a socket directory or pidfile in use, a bad listen address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockbackup.cli.daemonize import Daemonized, daemonize
from blockbackup.cli.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED
from blockbackup.cli.imageformat import SERVABLE, probe, qcow2_other_files, read_header
from blockbackup.cli.pidfile import PidFile
from blockbackup.cli.rundir import RunDir
from blockbackup.cli.serveerror import ServeError

DEFAULT_NBD_PORT = 10809


def add_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="export images over NBD, with a QMP monitor",
        description="Export disk images over NBD, with a QMP monitor for backup, jobs and "
        "bitmaps. Stops on Ctrl-C, SIGTERM, SIGHUP or the QMP command quit.",
    )
    serve.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="an image file or block device, exported under its name without extension",
    )
    serve.add_argument(
        "--format",
        choices=SERVABLE,
        help="the images' format (default: probed: qcow2 if the file has a qcow2 header, "
        "else raw; a qcow2 image with a backing file needs --format qcow2, and a writable "
        "raw export of a file with another image header needs --format raw)",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"NBD over TCP (e.g. 127.0.0.1:{DEFAULT_NBD_PORT}; default: a unix socket)",
    )
    serve.add_argument(
        "--dir",
        help="where to create the sockets; one serve per directory "
        "(default: a new temporary directory, removed at exit)",
    )
    serve.add_argument("--read-only", action="store_true", help="export read-only")
    serve.add_argument("--json", action="store_true", help="print the URIs as JSON")
    serve.add_argument(
        "--daemonize",
        action="store_true",
        help="run in the background; return once serving (after printing the URIs)",
    )
    serve.add_argument(
        "--pidfile",
        metavar="FILE",
        help="write the daemon's pid to FILE once serving (locked; removed at exit)",
    )
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        images = [_checked_image(i) for i in args.images]
        _refuse_duplicates(images)
        nbd_addr = _listen_address(args.listen) if args.listen else None
        formats = [choose_format(i, args.format, args.read_only) for i in images]
    except ServeError as exc:
        return _fail(exc)
    detached: Daemonized | None = None
    if args.daemonize:
        forked = daemonize()
        if isinstance(forked, int):
            return forked  # the parent: the child is serving, or failed and said why
        detached = forked
    try:
        return asyncio.run(
            serve(
                images,
                formats=formats,
                nbd_addr=nbd_addr,
                directory=args.dir,
                read_only=args.read_only,
                as_json=args.json,
                pidfile=args.pidfile,
                detached=detached,
            )
        )
    except ServeError as exc:
        return _fail(exc)
    except KeyboardInterrupt:  # Ctrl-C before the daemon's own handler was installed
        return EXIT_INTERRUPTED


def _fail(exc: ServeError) -> int:
    print(f"blockbackup serve: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _checked_image(image: str) -> str:
    path = os.path.abspath(image)
    if not os.path.exists(path):
        raise ServeError(f"no such image: {image}")
    if not os.path.isfile(path) and not Path(path).is_block_device():
        raise ServeError(f"not a file or block device: {image}")
    return path


def _refuse_duplicates(images: list[str]) -> None:
    """The same file twice (by device and inode, whatever the names) would be two writers."""
    seen: dict[tuple[int, int], str] = {}
    for image in images:
        st = os.stat(image)
        first = seen.setdefault((st.st_dev, st.st_ino), image)
        if first != image:
            raise ServeError(f"{image} is the same file as {first}: serve each image once")


@dataclass(frozen=True, slots=True)
class NbdAddress:
    host: str
    port: int

    def uri(self, name: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


def _listen_address(listen: str) -> NbdAddress:
    """``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``PORT``; checked by binding it."""
    host, sep, port_text = listen.rpartition(":")
    if not sep:
        host, port_text = "", listen
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ServeError(
            f"--listen wants HOST:PORT with a port from 1 to 65535"
            f" (e.g. 127.0.0.1:{DEFAULT_NBD_PORT}), not {listen!r}"
        )
    addr = NbdAddress(host, int(port_text))
    _check_bindable(addr)
    return addr


def _check_bindable(addr: NbdAddress) -> None:
    """Say now (in serve's words) what the daemon's bind would fail with."""
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {addr.host}: {exc.strerror}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ServeError(f"cannot listen on {addr.host}:{addr.port}: {why}") from exc


def choose_format(image: str, forced: str | None, read_only: bool) -> str:
    """The driver to serve ``image`` with: ``forced``, else probed from its header.

    A file with a known header that is not servable (vmdk, vdi, luks...) is served as raw
    only on ``--format raw`` when writable: its client would see and could overwrite the
    header. Read-only, its bytes are served as they are, with a note."""
    try:
        header = read_header(image, writable=not read_only)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and _readable(image):
            why += " (--read-only serves it without writing)"
        raise ServeError(f"cannot open {image}: {why}") from exc
    found = probe(header)
    if forced == "qcow2" and found != "qcow2":
        raise ServeError(f"{image} is not a qcow2 image ({found or 'no image header'})")
    if forced is not None:
        return forced
    if found is None:
        return "raw"
    if found == "qcow2":
        others = qcow2_other_files(header)
        if others:
            raise ServeError(
                f"{image} is a qcow2 image with {' and '.join(others)}: serve opens other"
                " files only when told the format (--format qcow2)"
            )
        return "qcow2"
    if not read_only:
        raise ServeError(
            f"{image} has a {found} header; blockbackup serves raw and qcow2 images:"
            " --format raw exports its bytes as they are (header included, writable)"
        )
    print(
        f"blockbackup serve: note: {image} has a {found} header; serving its bytes as raw",
        file=sys.stderr,
    )
    return "raw"


def _readable(image: str) -> bool:
    try:
        read_header(image, writable=False)
    except OSError:
        return False
    return True


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
    images: list[str],
    names: list[str],
    nbd_server: dict[str, Any],
    qmp_path: str,
    read_only: bool,
    formats: list[str] | None = None,
) -> list[str]:
    """The ``blockbackup daemon`` arguments that serve ``images`` (raw unless ``formats``)."""
    argv: list[str] = []
    for n, (image, name) in enumerate(zip(images, names, strict=True)):
        node = {
            "driver": formats[n] if formats else "raw",
            "node-name": name,
            "read-only": read_only,
            # serve holds the image's lock itself (cli/imagelock.py explains why)
            "file": {"driver": "file", "filename": os.path.abspath(image), "locking": "off"},
        }
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--nbd-server", json.dumps(nbd_server)]
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
    formats: list[str],
    nbd_addr: NbdAddress | None,
    directory: str | None,
    read_only: bool,
    as_json: bool,
    pidfile: str | None = None,
    detached: Daemonized | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run a daemon serving ``images`` until SIGINT/SIGTERM/SIGHUP or ``quit``; raises
    ServeError for what is wrong before it serves."""
    from blockbackup.daemon import Daemon  # lazy: start-up cost of the other commands
    from blockbackup.daemon_options import parse_args  # lazy, with the daemon

    with contextlib.ExitStack() as held:
        pid = PidFile.acquire(pidfile) if pidfile is not None else None
        if pid is not None:
            held.callback(pid.release)
        work = RunDir.acquire(directory)
        held.push(lambda exc_type, _exc, _tb: work.release(failed=exc_type is not None))
        from blockbackup.cli.imagelock import ImageLock  # lazy: the engine's start-up

        for image in images:
            held.callback(ImageLock.acquire(image, writable=not read_only).release)
        names = node_names(images)
        qmp_path = str(work.path / "qmp.sock")
        nbd_server: dict[str, Any]
        if nbd_addr is not None:
            nbd_server = {
                "addr": {"type": "inet", "host": nbd_addr.host, "port": str(nbd_addr.port)}
            }
            uris = [nbd_addr.uri(name) for name in names]
        else:
            sock = str(work.path / "nbd.sock")
            nbd_server = {"addr": {"type": "unix", "path": sock}}
            uris = [f"nbd+unix:///{name}?socket={sock}" for name in names]
        args = parse_args(serve_options(images, names, nbd_server, qmp_path, read_only, formats))
        exports = [
            {"image": i, "node": n, "format": f, "uri": u}
            for i, n, f, u in zip(images, names, formats, uris, strict=True)
        ]
        info: dict[str, Any] = {"qmp": qmp_path, "exports": exports}

        def ready() -> None:
            if pid is not None:
                pid.write()
            if as_json:
                print(json.dumps(info), flush=True)
            else:
                print(f"QMP monitor: {qmp_path}")
                for export in exports:
                    print(f"{export['node']}: {export['uri']}")
                if detached is None:
                    print("Ctrl-C to stop.")
                sys.stdout.flush()
            if detached is not None:
                detached.ready()
            if on_ready is not None:
                on_ready(info)

        daemon = Daemon("serve")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, daemon.request_shutdown)
        try:
            return await daemon.run(args.options, on_ready=ready)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
