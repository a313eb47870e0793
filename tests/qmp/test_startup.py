"""The daemon as scripts start it: clients that connect before start-up is complete.

The installed ``blockbackup daemon`` runs as a subprocess; a :class:`~testkit.startup.Gate`
holds it inside its command line (an ``nbd`` blockdev whose server answers only when the
test says so) while an NBD client and a QMP client connect the moment the daemon's
sockets exist. Nothing may answer them before every option is processed; if an option
fails, they see their connection closed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from testkit.startup import QEMU_NBD, SIZE, early_clients, held_daemon

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU_NBD is None, reason="qemu-nbd not installed"),
    pytest.mark.timeout(60),
]

DAEMON = [sys.executable, "-m", "blockbackup", "daemon"]


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
