"""Start-up ordering kit: hold a daemon inside its command line, connect clients early.

Why: "nothing is served before the whole command line has been processed" is only
testable if the daemon can be stopped half way through its options, deterministically.
:class:`Gate` does it with real parts: a ``--blockdev driver=nbd`` pointing at the gate's
socket makes the daemon wait (inside that option) until the test opens the gate, which
then forwards the connection to a real ``qemu-nbd``; :meth:`Gate.fail` closes it instead,
so the option fails and the daemon exits with its error. Meanwhile the test connects its
own clients as soon as the daemon's sockets exist (:func:`connect_early`) and speaks raw
NBD (:func:`nbd_go`) so that nothing but the daemon decides when it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

QEMU_NBD = shutil.which("qemu-nbd")
#: Size of the images the start-up scenario serves.
SIZE = 1 << 20

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC = 0x3E889045565A9
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2


class Gate:
    """A unix socket that holds each connection until :meth:`open` or :meth:`fail`."""

    def __init__(self, directory: Path, image: Path) -> None:
        self.path = directory / "gate.sock"
        self._real = directory / "real.sock"
        self._image = image
        self._decided: asyncio.Future[bool] | None = None
        self.connected = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._qemu_nbd: asyncio.subprocess.Process | None = None
        self._pipes: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gate]:
        assert QEMU_NBD is not None
        self._decided = asyncio.get_running_loop().create_future()
        self._qemu_nbd = await asyncio.create_subprocess_exec(
            QEMU_NBD,
            "--persistent",
            "--shared=4",
            "-f",
            "raw",
            "-x",
            "g",
            "-k",
            str(self._real),
            str(self._image),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._server = await asyncio.start_unix_server(self._hold, path=str(self.path))
        try:
            yield self
        finally:
            self._server.close()
            for task in self._pipes:
                task.cancel()
            for task in self._pipes:
                with contextlib.suppress(BaseException):
                    await task
            self._qemu_nbd.terminate()
            await self._qemu_nbd.wait()

    def open(self) -> None:
        """Let every held (and later) connection through to the real server."""
        assert self._decided is not None
        self._decided.set_result(True)

    def fail(self) -> None:
        """Close every held (and later) connection: the daemon's option fails."""
        assert self._decided is not None
        self._decided.set_result(False)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        assert self._decided is not None
        if not await asyncio.shield(self._decided):
            writer.close()
            return
        async with asyncio.timeout(10):
            while True:  # qemu-nbd creates its socket before it listens
                try:
                    up_r, up_w = await asyncio.open_unix_connection(str(self._real))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.01)
        self._pipes.append(asyncio.create_task(_pipe(reader, up_w)))
        self._pipes.append(asyncio.create_task(_pipe(up_r, writer)))


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except ConnectionError:
        pass
    finally:
        dst.close()


async def wait_for_path(path: Path, proc: asyncio.subprocess.Process) -> None:
    """Poll (bounded by the caller's timeout) until ``path`` exists or ``proc`` exits."""
    while not path.exists():  # noqa: ASYNC240  (a stat, polled on purpose)
        if proc.returncode is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before {path} existed")
        await asyncio.sleep(0.005)


async def connect_early(
    path: Path, proc: asyncio.subprocess.Process
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect as soon as the daemon's socket ``path`` exists (retrying while a daemon
    that creates the file before it listens refuses)."""
    await wait_for_path(path, proc)
    while True:
        try:
            return await asyncio.open_unix_connection(str(path))
        except ConnectionRefusedError:
            await asyncio.sleep(0.005)


def nbd_go_request(name: str) -> bytes:
    """The client's side of a fixed-newstyle handshake up to ``NBD_OPT_GO``, in one piece
    (sent before the server's greeting arrives: a server that is not ready must not
    answer it)."""
    data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    flags = struct.pack(">I", _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES)
    return flags + struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data


async def nbd_go_reply(reader: asyncio.StreamReader) -> list[object]:
    """Read the greeting and the replies to :func:`nbd_go_request`.

    Returns ``["ack", size]`` when the export was entered, ``["error", type, message]``
    when the server refused it, ``["closed", bytes_received]`` when the connection ended.
    """
    got = 0
    try:
        magic, opt, _ = struct.unpack(">QQH", await reader.readexactly(18))
        got = 18
        assert (magic, opt) == (_NBDMAGIC, _IHAVEOPT)
        size = -1
        while True:
            magic, _, rep, length = struct.unpack(">QIII", await reader.readexactly(20))
            assert magic == _REPLY_MAGIC
            payload = await reader.readexactly(length)
            got += 20 + length
            if rep == _REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                size = struct.unpack(">Q", payload[2:10])[0]
            elif rep == _REP_ACK:
                return ["ack", size]
            elif rep & 0x80000000:
                return ["error", rep, payload.decode(errors="replace")]
    except (asyncio.IncompleteReadError, ConnectionError):
        return ["closed", got]


def startup_args(d: Path) -> list[str]:
    """Monitor and NBD server first, then the gated option, then the export."""
    return [
        "--chardev",
        f"socket,id=m0,path={d}/qmp.sock,server=on,wait=off",
        "--monitor",
        "chardev=m0",
        "--nbd-server",
        f"addr.type=unix,addr.path={d}/nbd.sock",
        "--blockdev",
        f"driver=nbd,node-name=gated,server.type=unix,server.path={d}/gate.sock,export=g",
        "--blockdev",
        f"driver=file,node-name=diskf,filename={d}/disk.img",
        "--blockdev",
        "driver=raw,node-name=disk,file=diskf",
        "--export",
        "type=nbd,id=e0,node-name=disk,name=disk",
    ]


@contextlib.asynccontextmanager
async def held_daemon(
    d: Path, command: list[str]
) -> AsyncIterator[tuple[Gate, asyncio.subprocess.Process]]:
    (d / "disk.img").write_bytes(bytes(SIZE))
    (d / "gated.img").write_bytes(bytes(SIZE))
    async with Gate(d, d / "gated.img").running() as gate:
        proc = await asyncio.create_subprocess_exec(
            *command, *startup_args(d), stderr=asyncio.subprocess.PIPE, cwd=d
        )
        try:
            yield gate, proc
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def read_messages(reader: asyncio.StreamReader, count: int) -> list[dict[str, object]]:
    """Up to ``count`` QMP messages, fewer if the connection ends (closed or reset)."""
    out = []
    try:
        while len(out) < count and (line := await reader.readline()):
            out.append(json.loads(line))
    except ConnectionError:
        pass
    return out


async def early_clients(
    d: Path, gate: Gate, proc: asyncio.subprocess.Process, *, ok: bool
) -> list[object]:
    """Connect an NBD and a QMP client while the daemon is held; then decide the gate.

    Each client sends its whole request at once, before any greeting: a daemon that
    serves too early answers it at once (the export is not there yet).
    """
    nbd_r, nbd_w = await connect_early(d / "nbd.sock", proc)
    qmp_r, qmp_w = await connect_early(d / "qmp.sock", proc)
    await gate.connected.wait()  # the daemon is inside the gated option
    nbd_w.write(nbd_go_request("disk"))
    qmp_w.write(b'{"execute": "qmp_capabilities"}{"execute": "query-block-exports"}')
    await asyncio.gather(nbd_w.drain(), qmp_w.drain())
    gate.open() if ok else gate.fail()
    nbd = await nbd_go_reply(nbd_r)
    qmp = await read_messages(qmp_r, 3)
    nbd_w.close()
    qmp_w.close()
    return [nbd, [sorted(m) for m in qmp], qmp[2:]]
