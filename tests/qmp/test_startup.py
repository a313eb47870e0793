"""The daemon as scripts start it: clients that connect before start-up is complete.

The installed ``blockbackup daemon`` runs as a subprocess; a :class:`~testkit.startup.Gate`
holds it inside its command line (an ``nbd`` blockdev whose server answers only when the
test says so) while an NBD client and a QMP client connect the moment the daemon's
sockets exist. Nothing may answer them before every option is processed; if an option
fails, they see their connection closed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from testkit.startup import QEMU_NBD, Gate, connect_early, nbd_go_reply, nbd_go_request

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU_NBD is None, reason="qemu-nbd not installed"),
    pytest.mark.timeout(60),
]

DAEMON = [sys.executable, "-m", "blockbackup", "daemon"]
SIZE = 1 << 20


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


@asynccontextmanager
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


async def test_early_clients_wait_for_the_whole_command_line(tmp_path: Path) -> None:
    async with asyncio.timeout(30), held_daemon(tmp_path, DAEMON) as (gate, proc):
        nbd, qmp_keys, exports = await early_clients(tmp_path, gate, proc, ok=True)
        assert nbd == ["ack", SIZE]
        assert qmp_keys == [["QMP"], ["return"], ["return"]]
        assert [e["id"] for e in exports[0]["return"]] == ["e0"]
        proc.terminate()
        assert await proc.wait() == 0


async def test_early_clients_see_close_when_an_option_fails(tmp_path: Path) -> None:
    async with asyncio.timeout(30), held_daemon(tmp_path, DAEMON) as (gate, proc):
        nbd, qmp_keys, _ = await early_clients(tmp_path, gate, proc, ok=False)
        assert nbd == ["closed", 0]  # not even a greeting
        assert qmp_keys == []
        assert await proc.wait() == 1
        assert proc.stderr is not None
        assert (await proc.stderr.read()).startswith(b"blockbackup daemon: ")
