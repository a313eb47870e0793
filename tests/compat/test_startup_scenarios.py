"""Differential start-up scenario: clients that connect before the command line is done.

qemu-storage-daemon 7.2 processes every option before it serves anyone: an NBD client
that connects as soon as ``--nbd-server``'s socket exists, asking for an export that a
later ``--export`` creates, simply waits and then gets it; a QMP client that connects
early gets its greeting once start-up is complete. Both daemons are held inside the same
command line by a :class:`~testkit.startup.Gate` and must answer the early clients alike.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from compat.compat_kit import OURS, QSD, env_ok
from testkit.startup import QEMU_NBD, SIZE, early_clients, held_daemon

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.asyncio,
    pytest.mark.skipif(not env_ok() or QEMU_NBD is None, reason="QEMU tools not installed"),
    pytest.mark.timeout(60),
]


async def _early(d: Path, command: list[str], ok: bool) -> list[object]:
    async with held_daemon(d, command) as (gate, proc):
        seen = await early_clients(d, gate, proc, ok=ok)
        if ok:
            proc.terminate()
        seen.append(await proc.wait() if ok else (await proc.wait()) != 0)
        return seen


@pytest.mark.parametrize("ok", [True, False], ids=["options-succeed", "option-fails"])
async def test_early_clients(tmp_path: Path, ok: bool) -> None:
    assert QSD is not None
    for sub in ("qsd", "ours"):
        (tmp_path / sub).mkdir()
    async with asyncio.timeout(40):
        ref, ours = await asyncio.gather(
            _early(tmp_path / "qsd", [QSD], ok), _early(tmp_path / "ours", OURS, ok)
        )
    assert ours == ref
    if ok:  # the early clients succeeded (on both)
        assert ref[0] == ["ack", SIZE]
        assert ref[1] == [["QMP"], ["return"], ["return"]]
